"""Events by day: `runs_event` is range-partitioned on `ts`, one partition a UTC day.

Why: retention by age drops a day's partition (a catalogue change) instead of
deleting its rows one by one, which at millions of events a day held the hot table
busy and left it bloated; and a search bounded in time (the last 24 hours) reads
only the days it names. docs/scaling.md has the figures.

- `runs_event_pYYYYMMDD` holds [day, day + 1) in UTC. Beat creates them
  PARTITIONS_AHEAD days ahead (`ensure`), so the worker's COPY never waits on one.
- `runs_event_default` holds what no day partition covers: events an agent dated
  far in the past or the future (a replayed log, a wrong clock). When a day's
  partition is made later, its rows move out of the default first.
- The primary key is (id, ts), as PostgreSQL requires the partition key in every
  unique index; ids still come from one sequence, `runs_event_ids`.
- `drop_before(cutoff)` drops the day partitions that end at or before the cutoff.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from django.conf import settings
from django.db import connection, transaction

PARENT = "runs_event"
DEFAULT = "runs_event_default"
_DAY_NAME = re.compile(r"^runs_event_p(\d{8})$")


def name_of(day: date) -> str:
    return f"runs_event_p{day:%Y%m%d}"


def bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def days() -> list[date]:
    """The days that have a partition, oldest first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            [PARENT],
        )
        names = [row[0] for row in cursor.fetchall()]
    found = []
    for name in names:
        match = _DAY_NAME.match(name)
        if match:
            found.append(datetime.strptime(match.group(1), "%Y%m%d").date())
    return sorted(found)


def ensure(today: date | None = None, ahead: int | None = None) -> list[date]:
    """Create the partitions of today and the next `ahead` days that are missing;
    returns the days created."""
    today = today or datetime.now(UTC).date()
    ahead = settings.PARTITIONS_AHEAD if ahead is None else ahead
    have = set(days())
    made = []
    for n in range(ahead + 1):
        day = today + timedelta(days=n)
        if day not in have:
            create(day)
            made.append(day)
    return made


def create(day: date) -> None:
    """One day's partition. Rows of that day already in the default partition move
    into it first: PostgreSQL refuses a partition whose rows the default holds."""
    name, (start, end) = name_of(day), bounds(day)
    qn = connection.ops.quote_name
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE ts >= %s AND ts < %s)", [start, end]
        )
        if not cursor.fetchone()[0]:
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {qn(name)} PARTITION OF {PARENT}"
                " FOR VALUES FROM (%s) TO (%s)",
                [start, end],
            )
            return
        cursor.execute(f"CREATE TABLE {qn(name)} (LIKE {PARENT} INCLUDING DEFAULTS)")
        cursor.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT} WHERE ts >= %s AND ts < %s RETURNING *)"
            f" INSERT INTO {qn(name)} SELECT * FROM moved",
            [start, end],
        )
        cursor.execute(
            f"ALTER TABLE {PARENT} ATTACH PARTITION {qn(name)} FOR VALUES FROM (%s) TO (%s)",
            [start, end],
        )


def drop_before(cutoff: datetime) -> list[date]:
    """Drop the day partitions wholly older than `cutoff`; returns their days."""
    dropped = []
    for day in days():
        if bounds(day)[1] <= cutoff:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS {connection.ops.quote_name(name_of(day))}")
            dropped.append(day)
    return dropped
