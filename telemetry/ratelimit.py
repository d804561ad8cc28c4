"""Rate limits shared by every web process: fixed one-minute windows in PostgreSQL.

One upsert per request (`INSERT … ON CONFLICT DO UPDATE … RETURNING`) counts
the hit and reads the count atomically, so two web processes never both let
the 31st request through. Old windows are purged by beat
(`telemetry.tasks.purge_rate_counters`).
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.http import HttpRequest

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after: int  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class RateLimited(Exception):
    """Raised where a response cannot be returned directly (authentication)."""

    def __init__(self, verdict: Verdict):
        super().__init__(f"rate limit of {verdict.limit} requests per minute exceeded")
        self.verdict = verdict


def _window(now: float | None) -> tuple[int, int]:
    now = time.time() if now is None else now
    start = int(now // WINDOW_SECONDS) * WINDOW_SECONDS
    return start, max(1, math.ceil(start + WINDOW_SECONDS - now))


def _verdict(hits: int, limit: int, retry_after: int) -> Verdict:
    return Verdict(hits <= limit, limit, max(0, limit - hits), retry_after)


_HIT_SQL = """
INSERT INTO telemetry_ratecounter AS c (key, window_start, hits) VALUES (%s, %s, 1)
ON CONFLICT (key, window_start) DO UPDATE SET hits = c.hits + 1
RETURNING hits
"""


def hit(key: str, limit: int, now: float | None = None) -> Verdict | None:
    """Count one request against `key`. None when `limit` is 0 (unlimited)."""
    if limit <= 0:
        return None
    start, retry_after = _window(now)
    with connection.cursor() as cursor:
        cursor.execute(_HIT_SQL, [key[:200], start])
        (hits,) = cursor.fetchone()
    return _verdict(hits, limit, retry_after)


# The project's limit and the count in one round trip: this runs on every
# write request of the token endpoints, the hot ingest path included.
_PROJECT_HIT_SQL = """
WITH lim AS (
    SELECT COALESCE(
        (SELECT ingest_per_minute FROM telemetry_projectlimits WHERE project_id = %s), %s
    ) AS n
)
INSERT INTO telemetry_ratecounter AS c (key, window_start, hits)
SELECT %s, %s, 1 FROM lim WHERE lim.n > 0
ON CONFLICT (key, window_start) DO UPDATE SET hits = c.hits + 1
RETURNING hits, (SELECT n FROM lim)
"""


def hit_project(project_id: int, now: float | None = None) -> Verdict | None:
    """Count one write request of a project. None when its limit is 0 (unlimited)."""
    start, retry_after = _window(now)
    with connection.cursor() as cursor:
        cursor.execute(
            _PROJECT_HIT_SQL,
            [project_id, settings.INGEST_RATE_PER_MINUTE, f"project:{project_id}", start],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    hits, limit = row
    verdict = _verdict(hits, limit, retry_after)
    if not verdict.allowed:
        count_refusal(project_id, now)
    return verdict


# What the `rate_limited` alert reads (docs/alerts.md): 429s per project and minute,
# durable, kept as long as the project's event counts.
_REFUSAL_SQL = """
INSERT INTO telemetry_refusalcount AS c (project_id, minute, refused)
VALUES (%s, to_timestamp(%s), 1)
ON CONFLICT (project_id, minute) DO UPDATE SET refused = c.refused + 1
"""


def count_refusal(project_id: int, now: float | None = None) -> None:
    """Count one write request of a project answered 429. Paid only by refused requests."""
    start, _ = _window(now)
    with connection.cursor() as cursor:
        cursor.execute(_REFUSAL_SQL, [project_id, start])


def purge(now: float | None = None) -> int:
    """Drop windows that ended; they can no longer refuse anything."""
    start, _ = _window(now)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM telemetry_ratecounter WHERE window_start < %s", [start])
        return cursor.rowcount


def client_ip(request: HttpRequest) -> str:
    """The client's address for per-IP limits.

    REMOTE_ADDR, unless TRUSTED_PROXY_COUNT proxies sit in front of us: each of
    them appends the address it was connected from to X-Forwarded-For, so the
    N-th entry from the right is the last one a trusted proxy wrote. Anything
    left of it was sent by the client and may be made up.
    """
    remote = request.META.get("REMOTE_ADDR", "") or "unknown"
    proxies = settings.TRUSTED_PROXY_COUNT
    if proxies <= 0:
        return remote
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    forwarded = [part for part in forwarded if part]
    if not forwarded:
        return remote
    # Fewer entries than proxies: every entry was written by a trusted proxy.
    candidate = forwarded[-proxies] if len(forwarded) >= proxies else forwarded[0]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return remote
    return candidate


def ip_key(address: str) -> str:
    """A rate-limit key for an address. IPv6 clients are counted per /64:
    one host usually holds a whole /64 and could otherwise rotate addresses."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
