"""Storing run events: judged records to rows, in the transaction of their batch.

In order: scrub what needs it, give every record its run (created, locked and
counted by `runs.batches.RunBatch` on the run writer), number records within their run
(`seq`), COPY the rows, save the runs, turn error-level records into error groups,
add to the per-minute counts. Every receiver whose items become run events (the
events endpoint, OTLP logs) stores them here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import orjson
from django.db import connection

from portal.db import copy_text
from runs.batches import RunBatch
from runs.models import Project
from telemetry.errors import record_event_errors
from telemetry.ingest.records import Record, scrub
from telemetry.ingest.redaction import MAX_MESSAGE

# A timestamp in the ISO 8601 extended form both Python and PostgreSQL read the same
# way (hours, offsets and fractions within PostgreSQL's bounds): copy_rows then
# sends the client's text as is, instead of `isoformat()` (~1 µs a record).
_PLAIN_TS_PATTERN = (
    r"\d{4}-\d\d-\d\d[T ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
    r"(?:Z|[+-](?:0\d|1[0-5]):[0-5]\d)"
)
_PLAIN_TS = re.compile(_PLAIN_TS_PATTERN, re.ASCII).fullmatch
# The same test for a whole batch at once, on its timestamps joined by newlines
# (half the cost of one call a record); a batch that fails it is tested record by
# record.
_PLAIN_TS_LINES = re.compile(f"(?:{_PLAIN_TS_PATTERN}\n)*{_PLAIN_TS_PATTERN}", re.ASCII).fullmatch
_ANY_PLAIN_TS = "1970-01-01T00:00:00Z"  # stands for a record without ts_text

COPY_EVENTS = (
    "COPY runs_event (run_id, ts, seq, level, event, phase, message, data,"
    " request_id, trace_id, span_id, cost_usd) FROM STDIN"
)


def copy_rows(records: list[Record]) -> bytes:
    """The records as PostgreSQL COPY text: built in one buffer, sent in one write.

    Per record: one formatted prefix, the data as orjson writes it, a suffix.
    Text fields rarely hold a backslash, tab or line break, so they are tested
    together and escaped one by one only when one does.
    """
    parts: list[bytes] = []
    append = parts.append
    dumps = orjson.dumps
    texts = "\n".join([rec.ts_text or _ANY_PLAIN_TS for rec in records])
    # No text holds a line break (that would fool the joined test), and all are plain.
    all_plain = texts.count("\n") == len(records) - 1 and _PLAIN_TS_LINES(texts) is not None
    plain_ts = _PLAIN_TS
    for rec in records:
        text = f"{rec.event}\t{rec.phase}\t{rec.message}"
        if "\\" in text or "\n" in text or "\r" in text or text.count("\t") != 2:
            text = "\t".join((copy_text(rec.event), copy_text(rec.phase), copy_text(rec.message)))
        ts = rec.ts_text
        if ts is None or not (all_plain or plain_ts(ts)):
            ts = rec.ts.isoformat()
        append(f"{rec.run.id}\t{ts}\t{rec.seq}\t{rec.level}\t{text}\t".encode())
        # JSON escapes control characters itself; COPY needs its backslashes doubled.
        data = rec.data_json
        if data is None:
            data = dumps(rec.data, default=str)
        append(data.replace(b"\\", b"\\\\"))
        if rec.request_id or rec.trace_id or rec.span_id or rec.cost_usd is not None:
            ids = (copy_text(rec.request_id), copy_text(rec.trace_id), copy_text(rec.span_id))
            cost = "\\N" if rec.cost_usd is None else str(rec.cost_usd)
            append(("\t" + "\t".join(ids) + "\t" + cost + "\n").encode())
        else:
            append(b"\t\t\t\t\\N\n")
    return b"".join(parts)


def store_records(project: Project, pairs: list[tuple[bytes | None, Record]]) -> int:
    """Scrub, give runs, number, COPY events, save runs, group errors, count minutes.

    Must run inside a transaction: the caller commits it together with the batch state.
    """
    records = []
    append = records.append
    for raw, rec in pairs:
        # Most records need nothing (the body scan found nothing to walk): skip the call.
        if rec.walk is not False or len(rec.message) > MAX_MESSAGE:
            scrub(raw, rec)
        append(rec)
    if not records:
        return 0
    runs = RunBatch.open(project, records)
    tallies = runs.tallies
    for rec in records:
        tally = tallies[rec.run_id]
        run = tally.run
        if rec.seq is None:
            rec.seq = run.last_seq + 1
        if rec.seq > run.last_seq:
            run.last_seq = rec.seq
        tally.apply(rec)
    with connection.cursor() as cursor, cursor.copy(COPY_EVENTS) as copy:
        copy.write(copy_rows(records))
    runs.save()
    record_event_errors(project, records)  # error-level events and crashes -> error groups
    _count_events(project, records)  # last: its row locks are held only until the commit
    return len(records)


_COUNT_EVENTS = """
INSERT INTO runs_eventcount (project_id, minute, events, errors)
SELECT %s, to_timestamp(m * 60), e, r
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS t(m, e, r)
ORDER BY m
ON CONFLICT (project_id, minute) DO UPDATE
SET events = runs_eventcount.events + excluded.events,
    errors = runs_eventcount.errors + excluded.errors
"""


_MINUTE = timedelta(minutes=1)


def _count_events(project: Project, records: list[Record]) -> None:
    """Add the batch to the per-minute event counts (EventCount), in minute order so two
    workers upserting the same minutes lock them in the same order."""
    minutes: dict[int, list[int]] = {}
    # Records come mostly in time order: compare with the current minute's bounds
    # and compute a key only when a record falls outside them.
    low = high = None
    counts = [0, 0]
    for rec in records:
        ts = rec.ts
        if low is None or not low <= ts < high:
            key = int(ts.timestamp()) // 60
            low = datetime.fromtimestamp(key * 60, UTC)
            high = low + _MINUTE
            counts = minutes.get(key) or minutes.setdefault(key, [0, 0])
        counts[0] += 1
        if rec.level == "error":
            counts[1] += 1
    keys = sorted(minutes)
    with connection.cursor() as cursor:
        cursor.execute(
            _COUNT_EVENTS,
            [
                project.pk,
                keys,
                [minutes[k][0] for k in keys],
                [minutes[k][1] for k in keys],
            ],
        )
        if any(minutes[k][1] for k in keys):
            _count_slug_errors(cursor, project, records)


_COUNT_SLUG_ERRORS = """
INSERT INTO telemetry_slugerrorcount (project_id, slug, minute, errors)
SELECT %s, s, to_timestamp(m * 60), n
FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS t(s, m, n)
ORDER BY s, m
ON CONFLICT (project_id, slug, minute) DO UPDATE
SET errors = telemetry_slugerrorcount.errors + excluded.errors
"""


def _count_slug_errors(cursor, project: Project, records: list[Record]) -> None:
    """Error-level events per slug and minute (SlugErrorCount), for alerts scoped to one
    slug (docs/alerts.md). Only batches holding errors pay for it."""
    counts: dict[tuple[str, int], int] = {}
    for rec in records:
        if rec.level == "error":
            # The run's slug, which rules name (a record may leave its own empty).
            slug = rec.run.slug if rec.run is not None and rec.run.slug else rec.slug
            key = (slug[:200], int(rec.ts.timestamp()) // 60)
            counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    cursor.execute(
        _COUNT_SLUG_ERRORS,
        [project.pk, [k[0] for k in keys], [k[1] for k in keys], [counts[k] for k in keys]],
    )
