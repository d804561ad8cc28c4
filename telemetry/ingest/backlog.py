"""Backpressure: how much the spool holds for the workers, and when to refuse more.

A spooled request is durable and answered before a worker stores it, so requests can
outrun the workers; without a bound the spool would grow until the disk is full. Past
BACKLOG_MAX_BYTES_PER_PROJECT of pending spooled body for one project, or
BACKLOG_MAX_BYTES for the whole installation, `pipeline.accept` refuses that project's
write requests before reading their bodies, with Retry-After, until the workers have
caught up. Bytes rather than age, as Relay (`spool.envelopes.max_disk_size`) and the
OpenTelemetry Collector (`sending_queue` sized in requests or bytes) bound theirs: it
is the disk that must not fill, and a spool that holds requests through a broker or
worker outage is doing its job (docs/reliability.md).

The reading is one GROUP BY over the pending rows, made at most once a second per
process (less often when it gets slow) and shared by its threads: never a query per
request. The bound is therefore soft: it can be passed by what arrives within a second
and by requests already past the check, each at most its body limit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from telemetry.models import IngestBatch

REFRESH_S = 1.0
# A reading that took long is repeated less often: at most this share of one process's time.
MAX_SHARE = 0.05


@dataclass(frozen=True)
class ProjectBacklog:
    project_id: int
    batches: int
    bytes: int
    oldest: datetime


@dataclass(frozen=True)
class Reading:
    """The pending batches when last read, per project and in all."""

    projects: dict[int, ProjectBacklog] = field(default_factory=dict)
    read_at: datetime | None = None

    @property
    def batches(self) -> int:
        return sum(p.batches for p in self.projects.values())

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.projects.values())

    @property
    def oldest(self) -> datetime | None:
        return min((p.oldest for p in self.projects.values()), default=None)

    @property
    def full(self) -> bool:
        """The whole installation is past its bound: every project is refused."""
        return self.bytes >= settings.BACKLOG_MAX_BYTES

    def refuses(self, project_id: int) -> str | None:
        """Why a write request of this project is refused now, or None."""
        if self.full:
            return (
                f"ingest backlog of {self.bytes:,} spooled bytes is past the bound of "
                f"{settings.BACKLOG_MAX_BYTES:,} (BACKLOG_MAX_BYTES)"
            )
        found = self.projects.get(project_id)
        if found is not None and found.bytes >= settings.BACKLOG_MAX_BYTES_PER_PROJECT:
            return (
                f"this project's ingest backlog of {found.bytes:,} spooled bytes is past the "
                f"bound of {settings.BACKLOG_MAX_BYTES_PER_PROJECT:,} "
                "(BACKLOG_MAX_BYTES_PER_PROJECT)"
            )
        return None


def read() -> Reading:
    """A fresh reading (the status page, and the cache below)."""
    rows = IngestBatch.objects.backlog()
    projects = {row[0]: ProjectBacklog(*row) for row in rows}
    return Reading(projects, timezone.now())


_lock = threading.Lock()
_cached: Reading | None = None
_next_at = 0.0


def current() -> Reading:
    """The reading of this process, refreshed at most every REFRESH_S. One thread
    refreshes it while the others go on with the previous one."""
    global _cached, _next_at
    now = time.monotonic()
    if _cached is not None and now < _next_at:
        return _cached
    if not _lock.acquire(blocking=_cached is None):
        return _cached  # another thread is refreshing it
    try:
        if _cached is None or time.monotonic() >= _next_at:
            started = time.monotonic()
            _cached = read()
            took = time.monotonic() - started
            _next_at = time.monotonic() + max(REFRESH_S, took / MAX_SHARE)
        return _cached
    finally:
        _lock.release()


def forget() -> None:
    """Drop the cached reading: the next request reads the spool again."""
    global _cached, _next_at
    with _lock:
        _cached, _next_at = None, 0.0


def refusal(project_id: int) -> str | None:
    """Why this project's write request must wait, or None: see `Reading.refuses`."""
    return current().refuses(project_id)
