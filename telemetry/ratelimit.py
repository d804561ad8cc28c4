"""Rate limits shared by every web process: a sliding minute in PostgreSQL.

A key's requests are counted in 5-second slots; a request is let through when the
slots that overlap the last 60 seconds hold fewer than `limit`. The oldest slot is
counted whole, so no span of 60 seconds ever lets more than `limit` through (fixed
one-minute windows let twice the rate through across a boundary), at the price of
a refused client waiting up to 5 s longer than a perfect sliding log would make it.

One statement per request counts the hit and reads the total atomically: the
current slot's row is the lock, so two web processes never both let the 31st
request through. A refused request is not counted, so a client retrying in a
loop is let through again as soon as its oldest requests leave the window. Old
slots are purged by beat (`telemetry.tasks.purge_rate_counters`).
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
SLOT_SECONDS = 5
# Keys of this prefix count over longer windows (portal/login.py: failed sign-ins over
# 15 minutes); purge keeps them that long.
LONG_PREFIX = "login:"
LONG_WINDOW_SECONDS = 15 * 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    retry_after: int  # seconds until a request would be let through again

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


@dataclass(frozen=True)
class _Window:
    now: float
    slot: int  # epoch seconds the current slot starts at
    oldest: int  # the oldest slot that overlaps the last `seconds`
    seconds: int = WINDOW_SECONDS

    @classmethod
    def at(cls, now: float | None, seconds: int = WINDOW_SECONDS) -> _Window:
        now = time.time() if now is None else now
        return cls(
            now=now,
            slot=int(now // SLOT_SECONDS) * SLOT_SECONDS,
            oldest=int((now - seconds) // SLOT_SECONDS) * SLOT_SECONDS,
            seconds=seconds,
        )

    def params(self, key: str, limit: int | None = None) -> dict:
        return {"key": key[:200], "slot": self.slot, "oldest": self.oldest, "limit": limit}


# Counts the request in the current slot only while the window holds fewer than
# the limit; one row back always: the window's total once counted (NULL when
# refused or unlimited) and the limit. The earlier slots are read in the
# statement's snapshot; they no longer change, and the current slot's row, locked
# by the upsert, serialises the requests that compete for the last place.
_COUNT = """
earlier AS (
    SELECT COALESCE(SUM(hits), 0) AS n FROM telemetry_ratecounter
    WHERE key = %(key)s AND window_start >= %(oldest)s AND window_start < %(slot)s
),
counted AS (
    INSERT INTO telemetry_ratecounter AS c (key, window_start, hits)
    SELECT %(key)s, %(slot)s, 1 FROM earlier, lim WHERE lim.n > 0 AND earlier.n < lim.n
    ON CONFLICT (key, window_start) DO UPDATE SET hits = c.hits + 1
    WHERE c.hits + (SELECT n FROM earlier) < (SELECT n FROM lim)
    RETURNING c.hits + (SELECT n FROM earlier) AS total
)
SELECT (SELECT total FROM counted), (SELECT n FROM lim)
"""
_HIT_SQL = "WITH lim AS (SELECT %(limit)s::integer AS n), " + _COUNT

# The project's limit and the count in one round trip: this runs on every
# write request of the token endpoints, the hot ingest path included.
_PROJECT_HIT_SQL = (
    """WITH lim AS (
    SELECT COALESCE(
        (SELECT ingest_per_minute FROM telemetry_projectlimits WHERE project_id = %(project)s),
        %(limit)s
    ) AS n
), """
    + _COUNT
)

_SLOTS_SQL = """
SELECT window_start, hits FROM telemetry_ratecounter
WHERE key = %(key)s AND window_start >= %(oldest)s ORDER BY window_start
"""


def hit(
    key: str, limit: int, now: float | None = None, seconds: int = WINDOW_SECONDS
) -> Verdict | None:
    """Count one request against `key` (at most `limit` per `seconds`). None when
    `limit` is 0 (unlimited)."""
    if limit <= 0:
        return None
    window = _Window.at(now, seconds)
    params = window.params(key, limit)
    with connection.cursor() as cursor:
        cursor.execute(_HIT_SQL, params)
        total, _ = cursor.fetchone()
    if total is None:
        return _refused(params, limit, window)
    return Verdict(True, limit, max(0, limit - total), 0)


def hit_project(project_id: int, now: float | None = None) -> Verdict | None:
    """Count one write request of a project. None when its limit is 0 (unlimited)."""
    window = _Window.at(now)
    params = window.params(f"project:{project_id}", settings.INGEST_RATE_PER_MINUTE)
    params["project"] = project_id
    with connection.cursor() as cursor:
        cursor.execute(_PROJECT_HIT_SQL, params)
        total, limit = cursor.fetchone()
    if limit <= 0:
        return None
    if total is None:
        count_refusal(project_id, now)
        return _refused(params, limit, window)
    return Verdict(True, limit, max(0, limit - total), 0)


# What the `rate_limited` alert reads (docs/alerts.md): 429s per project and minute,
# durable, kept as long as the project's event counts.
_REFUSAL_SQL = """
INSERT INTO telemetry_refusalcount AS c (project_id, minute, refused)
VALUES (%s, to_timestamp(%s), 1)
ON CONFLICT (project_id, minute) DO UPDATE SET refused = c.refused + 1
"""


def count_refusal(project_id: int, now: float | None = None) -> None:
    """Count one write request of a project answered 429. Paid only by refused requests."""
    minute = int((time.time() if now is None else now) // 60) * 60
    with connection.cursor() as cursor:
        cursor.execute(_REFUSAL_SQL, [project_id, minute])


def peek(key: str, limit: int, now: float | None = None, seconds: int = WINDOW_SECONDS) -> Verdict:
    """Whether one more request of `key` would be let through, counting nothing."""
    window = _Window.at(now, seconds)
    params = window.params(key, limit)
    with connection.cursor() as cursor:
        cursor.execute(_SLOTS_SQL, params)
        total = sum(hits for _, hits in cursor.fetchall())
    if total < limit:
        return Verdict(True, limit, limit - total, 0)
    return _refused(params, limit, window)


def forget(key: str) -> None:
    """Drop every count of `key` (a sign-in succeeded: its failures are forgiven)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM telemetry_ratecounter WHERE key = %s", [key[:200]])


def _refused(params: dict, limit: int, window: _Window) -> Verdict:
    """A refusal, with the wait until enough of the oldest slots leave the window."""
    with connection.cursor() as cursor:
        cursor.execute(_SLOTS_SQL, params)
        slots = cursor.fetchall()
    total = sum(hits for _, hits in slots)
    free_at = window.now + SLOT_SECONDS
    for start, hits in slots:
        # A slot leaves the window once its end is `seconds` in the past.
        free_at = start + SLOT_SECONDS + window.seconds
        total -= hits
        if total < limit:
            break
    return Verdict(False, limit, 0, max(1, math.ceil(free_at - window.now)))


def purge(now: float | None = None) -> int:
    """Drop slots that left the window; they can no longer refuse anything."""
    window = _Window.at(now)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM telemetry_ratecounter WHERE window_start < %s", [window.oldest])
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
