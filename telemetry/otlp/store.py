"""The worker's side: store a spooled OTLP body (runs.ingest.BATCH_HANDLERS).

Each handler decodes the body again with the request's code (codec.decode), maps
the accepted items (mapping.py) and writes them:

* logs become Events through `runs.ingest.store_records` (run resolution,
  redaction, lifecycle, COPY);
* spans are COPYed into a temporary table and moved with
  `INSERT … ON CONFLICT DO NOTHING`, so a retried export stores nothing twice;
* metric points become RunMetric rows (source "otlp"), written with one COPY.

The runs items open or touch are written by the helpers at the end of this module.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

import orjson
from django.conf import settings
from django.db import connection

from runs.ingest import copy_text, store_records
from runs.models import Run
from telemetry.otlp.codec import decode
from telemetry.otlp.items import LOGS, METRICS, TRACES
from telemetry.otlp.mapping import (
    CONTEXT_NAMES,
    bounded,
    clean,
    context_attributes,
    log_record,
    metric_labels,
    ns_time,
    run_ref,
    run_slug,
    scope_derived,
    span_parts,
    trace_run,
)


def _copy_json(value: Any) -> bytes:
    # JSON escapes control characters itself; COPY needs its backslashes doubled.
    return orjson.dumps(value, default=str).replace(b"\\", b"\\\\")


# --- Logs -> Events ----------------------------------------------------------------


def store_logs_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /v1/logs` body as run events; returns the events stored."""
    decoded = decode(LOGS, body, batch.params.get("encoding") == "json")
    records = [log_record(item, batch.received_at) for item in decoded.items]
    if not records:
        return 0
    # Records that name no run follow the run their trace's spans (or records) name.
    refs = [
        "" if rec.trace_id and rec.run_id == trace_run(rec.trace_id) else rec.run_id
        for rec in records
    ]
    if not all(refs):
        named = _named_trace_runs(batch.project, records, refs)
        for rec, ref in zip(records, refs, strict=True):
            if not ref and rec.trace_id in named:
                rec.run_id = named[rec.trace_id]
    stored = store_records(batch.project, [(None, rec) for rec in records])
    # The run's attributes follow the newest work context its records carry.
    context: dict[int, dict] = {}
    for rec in records:
        attrs = context_attributes(rec.data)
        if attrs:
            context.setdefault(rec.run.pk, {}).update(attrs)
    _merge_run_attributes(context)
    return stored


# --- Traces -> Spans ---------------------------------------------------------------

SPAN_COLUMNS = (
    "project_id, run_id, trace_id, span_id, parent_span_id, name, kind, service,"
    " start_time, end_time, duration_ms, status_code, status_message, attributes,"
    " resource, events"
)


# The loading table of a connection, kept across its transactions and emptied in
# place when each commits: no new file per batch (TRUNCATE), no dead rows that no
# autovacuum would ever clean (DELETE). Rows left by an earlier batch of the same
# transaction (tests only: a worker commits every batch) are the same spans again,
# which ON CONFLICT skips. JSON columns are text here: PostgreSQL parses each value
# once, on the way into telemetry_span.
_SPAN_LOAD_TABLE = """CREATE TEMP TABLE IF NOT EXISTS otlp_span_load (
    project_id bigint, run_id bigint, trace_id text, span_id text, parent_span_id text,
    name text, kind smallint, service text, start_time timestamptz, end_time timestamptz,
    duration_ms double precision, status_code smallint, status_message text,
    attributes text, resource text, events text) ON COMMIT DELETE ROWS"""
_SPAN_SELECT = SPAN_COLUMNS.replace("attributes,", "attributes::jsonb,").replace(
    "resource, events", "resource::jsonb, events::jsonb"
)


def store_traces_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /v1/traces` body as Span rows; returns the spans new to us.

    A span already stored (same project, trace and span id) is left as it is, so a
    retried export changes nothing.
    """
    decoded = decode(TRACES, body, batch.params.get("encoding") == "json")
    if not decoded.items:
        return 0
    project = batch.project
    # Runs: by attribute, else one per trace. Per run: first start, last end, the root
    # span that finishes a run of its own trace, and the newest context.
    refs: list[str] = [run_ref(item.attrs, item.scope) for item in decoded.items]
    named = _named_trace_runs(project, decoded.items, refs)
    spans: list[tuple] = []
    runs: dict[str, dict] = {}
    for i, item in enumerate(decoded.items):
        run_id = refs[i] = refs[i] or named.get(item.trace_id) or trace_run(item.trace_id)
        start, end = ns_time(item.start_ns), ns_time(item.end_ns)
        attrs, events, status_message = span_parts(item)
        spans.append((start, end, attrs, events, status_message))
        run = runs.get(run_id)
        if run is None:
            runs[run_id] = run = _new_run(run_slug(item.attrs, item.scope), start)
            run["last_event_at"], run["attributes"] = end, {}
        run["started_at"], run["last_event_at"] = (
            min(run["started_at"], start),
            max(run["last_event_at"], end),
        )
        if not item.parent_span_id and run_id == trace_run(item.trace_id):
            run["finish"] = "failed" if item.status_code == 2 else "succeeded"
            run["end"] = end
        run["attributes"].update(scope_derived(item.scope)["context"])
        if not CONTEXT_NAMES.isdisjoint(attrs):  # the span's own context wins
            run["attributes"].update(
                context_attributes({**scope_derived(item.scope)["base"], **attrs})
            )
    for run in runs.values():
        if "finish" in run:  # new runs are written finished at once
            run.update(status=run["finish"], finished_at=run["end"], exit_clean=True)
            run["duration_ms"] = max(
                0, int((run["end"] - run["started_at"]).total_seconds() * 1000)
            )
    run_pks, created = _ensure_runs(project, runs)
    if named:
        _adopt_trace_spans(project, named, run_pks)

    resources: dict[int, bytes] = {}  # id(scope) -> COPY text of its resource
    parts: list[bytes] = []
    append = parts.append
    for item, run_id, (start, end, attrs, events, status_message) in zip(
        decoded.items, refs, spans, strict=True
    ):
        scope = item.scope
        key = id(scope)
        if key not in resources:
            resource, _ = clean(bounded(dict(scope.resource))[0])
            resources[key] = _copy_json(resource)
        text = "\t".join(
            (
                str(project.pk),
                str(run_pks[run_id]),
                item.trace_id,
                item.span_id,
                item.parent_span_id,
                copy_text(item.name[:200]),
                str(item.kind),
                copy_text(scope_derived(scope)["service"]),
                start.isoformat(),
                end.isoformat(),
                repr((item.end_ns - item.start_ns) / 1e6),
                str(item.status_code),
                copy_text(status_message),
                "",
            )
        )
        append(text.encode())
        append(_copy_json(attrs))
        append(b"\t")
        append(resources[key])
        append(b"\t")
        append(_copy_json(events))
        append(b"\n")

    with connection.cursor() as cursor:
        cursor.execute(_SPAN_LOAD_TABLE)
        with cursor.copy(f"COPY otlp_span_load ({SPAN_COLUMNS}) FROM STDIN") as copy:
            copy.write(b"".join(parts))
        cursor.execute(
            f"INSERT INTO telemetry_span ({SPAN_COLUMNS}) SELECT {_SPAN_SELECT}"
            " FROM otlp_span_load ON CONFLICT (project_id, trace_id, span_id) DO NOTHING"
        )
        stored = cursor.rowcount
    existing = {run_pks[r]: run for r, run in runs.items() if r not in created}
    if existing:
        _lock_runs(list(existing))
        _update_span_runs(existing)
    return stored


# --- Metrics -> RunMetric ----------------------------------------------------------

METRIC_COLUMNS = "project_id, run_id, name, value, unit, labels, recorded_at, source, histogram"


def store_metrics_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /v1/metrics` body as RunMetric rows; returns the rows stored."""
    decoded = decode(METRICS, body, batch.params.get("encoding") == "json")
    if not decoded.items:
        return 0
    project = batch.project
    refs = [run_ref(item.attrs, item.scope) for item in decoded.items]
    wanted: dict[str, dict] = {}
    for item, run_id in zip(decoded.items, refs, strict=True):
        if run_id and run_id not in wanted:
            wanted[run_id] = _new_run(run_slug(item.attrs, item.scope), ns_time(item.time_ns))
    run_pks, _ = _ensure_runs(project, wanted)
    keys = settings.OTLP_RUN_ATTRIBUTES
    parts: list[bytes] = []
    for item, run_id in zip(decoded.items, refs, strict=True):
        labels, _ = clean(metric_labels(item, keys))
        row = "\t".join(
            (
                str(project.pk),
                str(run_pks[run_id]) if run_id else "\\N",
                copy_text(item.name[:200]),
                repr(item.value),
                copy_text(item.unit[:32]),
                "",
            )
        ).encode()
        hist = _copy_json(item.histogram) if item.histogram is not None else b"\\N"
        tail = f"\t{ns_time(item.time_ns).isoformat()}\totlp\t".encode()
        parts.append(row + _copy_json(labels) + tail + hist + b"\n")
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY runs_runmetric ({METRIC_COLUMNS}) FROM STDIN") as copy,
    ):
        copy.write(b"".join(parts))
    return len(parts)


# === Run writing ===================================================================
# Creating the runs items name and updating the runs they touch. Kept together
# because the runs app's single run writer replaces this whole section.


# What a new run takes from the items that open it; every other column its default.
_RUN_VARYING = {
    "run_id": "text",
    "slug": "text",
    "started_at": "timestamptz",
    "last_event_at": "timestamptz",
    "status": "text",
    "finished_at": "timestamptz",
    "exit_clean": "boolean",
    "duration_ms": "bigint",
    "attributes": "jsonb",
}


@cache
def _insert_runs_sql() -> tuple[str, list]:
    """INSERT of new runs from one array per _RUN_VARYING column; the other columns take
    the model's defaults, prepared by their fields as the ORM would."""
    qn = connection.ops.quote_name
    fields = [f for f in Run._meta.concrete_fields if not f.primary_key]
    selects = [
        f"v.{f.name}" if f.name in _RUN_VARYING else f"%s::{f.cast_db_type(connection)}"
        for f in fields
    ]
    arrays = ", ".join(f"%s::{kind}[]" for kind in _RUN_VARYING.values())
    sql = (
        f"INSERT INTO {qn(Run._meta.db_table)} ({', '.join(qn(f.column) for f in fields)})"
        f" SELECT {', '.join(selects)} FROM unnest({arrays}) AS v({', '.join(_RUN_VARYING)})"
        " ON CONFLICT (project_id, run_id) DO NOTHING RETURNING run_id, id"
    )
    return sql, [f for f in fields if f.name not in _RUN_VARYING]


_STORED_TRACE_RUNS = """
SELECT DISTINCT ON (s.trace_id) s.trace_id, r.run_id
FROM telemetry_span s JOIN runs_run r ON r.id = s.run_id
WHERE s.project_id = %s AND s.trace_id = ANY(%s) AND r.run_id <> 'trace-' || s.trace_id
ORDER BY s.trace_id, s.id
"""


def _named_trace_runs(project, items: list, refs: list[str]) -> dict[str, str]:
    """trace id -> the run a span or record of that trace names, in this request or in
    spans stored before: a trace is one run, so what names no run follows its trace."""
    named: dict[str, str] = {}
    for item, ref in zip(items, refs, strict=True):
        if ref and item.trace_id:
            named.setdefault(item.trace_id, ref)
    unnamed = {item.trace_id for item, ref in zip(items, refs, strict=True) if not ref}
    unnamed.discard("")
    unnamed -= named.keys()
    if unnamed:
        with connection.cursor() as cursor:
            cursor.execute(_STORED_TRACE_RUNS, [project.pk, sorted(unnamed)])
            named.update(cursor.fetchall())
    return named


def _adopt_trace_spans(project, named: dict[str, str], run_pks: dict[str, int]) -> None:
    """Spans stored earlier in the run of their trace (`trace-<id>`, because the span
    naming the run came later: a root span ends, and is exported, last) move to the
    named run; the trace's run goes if nothing else is in it."""
    synthetic = {trace_run(trace): run_pks[run] for trace, run in named.items()}
    found = dict(
        Run.objects.filter(project=project, run_id__in=list(synthetic)).values_list("run_id", "id")
    )
    if not found:
        return
    old = list(found.values())
    new = [synthetic[run_id] for run_id in found]
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE telemetry_span s SET run_id = v.new FROM unnest(%s::bigint[], %s::bigint[])"
            " AS v(old, new) WHERE s.run_id = v.old AND s.project_id = %s",
            [old, new, project.pk],
        )
        # The named run starts with the earliest of its trace.
        cursor.execute(
            "UPDATE runs_run AS r SET started_at = LEAST(r.started_at, t.started_at)"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(old, new), runs_run t"
            " WHERE r.id = v.new AND t.id = v.old",
            [old, new],
        )
    Run.objects.filter(pk__in=old, events_count=0).delete()


def _new_run(slug: str, at: datetime) -> dict:
    return {"slug": slug, "started_at": at, "status": Run.Status.RUNNING}


def _ensure_runs(project, wanted: dict[str, dict]) -> tuple[dict[str, int], set[str]]:
    """run_id -> Run.pk, creating the runs not seen before, and the run_ids created.

    A new run is written whole (slug, times, status, attributes from `wanted`) by one
    INSERT … FROM unnest: a trace is a run of its own, so a batch of spans often opens
    dozens of runs; bulk_create would prepare every field of every run in Python, and
    an UPDATE after the INSERT would write each run twice.
    """
    if not wanted:
        return {}, set()
    runs = Run.objects.filter(project=project)
    found = dict(runs.filter(run_id__in=list(wanted)).values_list("run_id", "id"))
    missing = [run_id for run_id in wanted if run_id not in found]
    created: set[str] = set()
    if missing:
        sql, constant = _insert_runs_sql()
        template = Run(project=project)
        params = [f.get_db_prep_save(getattr(template, f.attname), connection) for f in constant]
        for name, kind in _RUN_VARYING.items():
            values = [
                run_id if name == "run_id" else wanted[run_id].get(name) for run_id in missing
            ]
            if kind == "jsonb":
                values = [orjson.dumps(v or {}).decode() for v in values]
            elif kind == "boolean":
                values = [bool(v) for v in values]
            params.append(values)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        found.update(rows)
        created = {run_id for run_id, _ in rows}
        if len(found) < len(wanted):  # created meanwhile by another batch
            found.update(runs.filter(run_id__in=missing).values_list("run_id", "id"))
    return found, created


def _lock_runs(ids: list[int]) -> None:
    # Same order as runs.ingest: two batches touching the same runs cannot deadlock.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM runs_run WHERE id = ANY(%s) ORDER BY id FOR UPDATE", [sorted(ids)]
        )


def _merge_run_attributes(context: dict[int, dict]) -> None:
    """Put the newest work context (and service, role, agent) on each run."""
    context = {pk: attrs for pk, attrs in context.items() if attrs}
    if not context:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE runs_run AS r SET attributes = r.attributes || v.attrs"
            " FROM unnest(%s::bigint[], %s::jsonb[]) AS v(id, attrs) WHERE r.id = v.id",
            [list(context), [orjson.dumps(a).decode() for a in context.values()]],
        )


def _update_span_runs(runs: dict[int, dict]) -> None:
    """Spans are signs of life of a run that existed before the batch; the root span of
    a trace finishes the run of that trace; the newest work context goes on the run."""
    ids, firsts, lasts, statuses, ends, attrs = [], [], [], [], [], []
    for pk, run in runs.items():
        ids.append(pk)
        firsts.append(run["started_at"])
        lasts.append(run["last_event_at"])
        statuses.append(run.get("finish", ""))
        ends.append(run.get("end"))
        attrs.append(orjson.dumps(run["attributes"]).decode())
    finishing = "v.status <> '' AND r.status IN ('running', 'orphaned')"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""UPDATE runs_run AS r SET
                started_at = LEAST(r.started_at, v.first_at),
                last_event_at = GREATEST(r.last_event_at, v.last_at),
                status = CASE WHEN {finishing} THEN v.status
                              WHEN r.status = 'orphaned' THEN 'running' ELSE r.status END,
                finished_at = CASE WHEN {finishing} THEN v.end_at ELSE r.finished_at END,
                exit_clean = CASE WHEN {finishing} THEN true ELSE r.exit_clean END,
                duration_ms = CASE WHEN {finishing} THEN GREATEST(0, (1000 * extract(epoch
                    FROM v.end_at - LEAST(r.started_at, v.first_at)))::bigint)
                    ELSE r.duration_ms END,
                attributes = r.attributes || v.attrs
            FROM unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[], %s::text[],
                        %s::timestamptz[], %s::jsonb[])
                AS v(id, first_at, last_at, status, end_at, attrs)
            WHERE r.id = v.id""",
            [ids, firsts, lasts, statuses, ends, attrs],
        )
