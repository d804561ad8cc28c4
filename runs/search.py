"""Finding events across runs: `/search` and `GET /api/events/search` (docs/search.md).

A case-insensitive substring of the event's name, its message or the text of its
data, within a time window (the last 24 hours unless asked), newest first, in keyset
pages. No index serves the substring: the day partitions of `runs_event`
(runs/partitions.py) bound what is read to the window's days, and PostgreSQL reads
them with parallel workers. An index that could (trigrams over the data) would cost
every insert; docs/scaling.md has the measurements that chose this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.urls import reverse
from django.utils.http import urlencode

from runs.models import LEVELS

DEFAULT_WINDOW = timedelta(hours=24)
MAX_QUERY = 200
MESSAGE_PREVIEW = 300


class SearchError(ValueError):
    """A search that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Search:
    q: str
    project_ids: list[int] | None = None  # None: every project (an operator)
    slug: str = ""
    level: str = ""  # the minimum level
    event: str = ""  # an event name prefix
    since: datetime | None = None
    until: datetime | None = None
    cursor: str = ""
    limit: int = 50

    def window(self) -> tuple[datetime, datetime]:
        until = self.until or datetime.now(UTC)
        since = self.since or until - DEFAULT_WINDOW
        if since >= until:
            raise SearchError("since must be before until")
        return since, until


def like_pattern(text: str) -> str:
    """`text` as a LIKE pattern matching itself only."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        micros, _, event_id = cursor.partition(".")
        ts = datetime.fromtimestamp(int(micros) / 1_000_000, UTC)
        return ts, int(event_id)
    except (ValueError, OverflowError, OSError):
        raise SearchError("cursor: use the next_cursor of the previous page") from None


def encode_cursor(ts: datetime, event_id: int) -> str:
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return f"{micros}.{event_id}"


_SQL = """
SELECT e.id, e.ts, e.seq, e.level, e.event, e.phase, left(e.message, {preview}),
       r.run_id, r.slug, p.slug
FROM runs_event e
JOIN runs_run r ON r.id = e.run_id
JOIN runs_project p ON p.id = r.project_id
WHERE e.ts >= %(since)s AND e.ts < %(until)s
  AND (e.event ILIKE %(pattern)s OR e.message ILIKE %(pattern)s
       OR e.data::text ILIKE %(pattern)s)
  {filters}
ORDER BY e.ts DESC, e.id DESC
LIMIT %(limit)s
"""


def search(s: Search) -> tuple[list[dict], str | None]:
    """One page of events matching `s`, newest first, and the cursor of the next."""
    q = s.q.strip()
    if not q:
        raise SearchError("q: say what to look for")
    if len(q) > MAX_QUERY:
        raise SearchError(f"q: at most {MAX_QUERY} characters")
    since, until = s.window()
    params: dict = {
        "since": since,
        "until": until,
        "pattern": f"%{like_pattern(q)}%",
        "limit": s.limit + 1,
    }
    filters = []
    if s.project_ids is not None:
        filters.append("AND r.project_id = ANY(%(projects)s)")
        params["projects"] = list(s.project_ids)
    if s.slug:
        filters.append("AND r.slug = %(slug)s")
        params["slug"] = s.slug
    if s.level:
        if s.level not in LEVELS:
            raise SearchError(f"level: one of {', '.join(LEVELS)}")
        filters.append("AND e.level = ANY(%(levels)s)")
        params["levels"] = list(LEVELS[LEVELS.index(s.level) :])
    if s.event:
        filters.append("AND e.event LIKE %(prefix)s")
        params["prefix"] = like_pattern(s.event) + "%"
    if s.cursor:
        params["cursor_ts"], params["cursor_id"] = decode_cursor(s.cursor)
        filters.append("AND (e.ts, e.id) < (%(cursor_ts)s, %(cursor_id)s)")
    sql = _SQL.format(preview=MESSAGE_PREVIEW, filters="\n  ".join(filters))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    more = len(rows) > s.limit
    rows = rows[: s.limit]
    items = [
        {
            "project": project,
            "run_id": run_id,
            "slug": slug,
            "seq": seq,
            "ts": ts,
            "level": level,
            "event": event,
            "phase": phase,
            "message": message,
            "url": timeline_url(project, run_id, seq),
        }
        for _, ts, seq, level, event, phase, message, run_id, slug, project in rows
    ]
    next_cursor = encode_cursor(rows[-1][1], rows[-1][0]) if more else None
    return items, next_cursor


def timeline_url(project: str, run_id: str, seq: int) -> str:
    """The run's timeline opened at the event (its page starts just before it)."""
    query = urlencode({"project": project, "after": max(seq - 1, 0)})
    return f"{reverse('runs:detail', args=[run_id])}?{query}#e{seq}"
