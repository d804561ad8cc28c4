"""The worker's side: store a spooled OTLP body (telemetry/receivers/otlp.py).

Each handler decodes the body again with the request's code (codec.decode), maps
the accepted items (mapping.py) and writes them:

* logs become Events through `telemetry.ingest.store.store_records` (run resolution,
  redaction, lifecycle, COPY);
* spans are COPYed into a temporary table and moved with
  `INSERT … ON CONFLICT DO NOTHING`, so a retried export stores nothing twice;
* metric points become RunMetric rows (source "otlp"), written with one COPY.

The runs items open or touch are written by the helpers at the end of this module.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import connection

from portal.db import copy_json, copy_text
from runs.models import Run
from telemetry.ingest.store import store_records
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
    Run.objects.merge_attributes(context)
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
    return store_spans(batch.project, decoded.items)


def store_spans(project, items: list) -> int:
    """Store SpanIn items (OTLP spans, Sentry transactions) of a project as Span rows,
    giving them runs; returns the spans new to us."""
    if not items:
        return 0
    # Runs: by attribute, else one per trace. Per run: first start, last end, the root
    # span that finishes a run of its own trace, and the newest context.
    refs: list[str] = [run_ref(item.attrs, item.scope) for item in items]
    named = _named_trace_runs(project, items, refs)
    spans: list[tuple] = []
    runs: dict[str, dict] = {}
    for i, item in enumerate(items):
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
        items, refs, spans, strict=True
    ):
        scope = item.scope
        key = id(scope)
        if key not in resources:
            resource, _ = clean(bounded(dict(scope.resource))[0])
            resources[key] = copy_json(resource)
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
        append(copy_json(attrs))
        append(b"\t")
        append(resources[key])
        append(b"\t")
        append(copy_json(events))
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
    Run.objects.touch_from_spans({run_pks[r]: run for r, run in runs.items() if r not in created})
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
        hist = copy_json(item.histogram) if item.histogram is not None else b"\\N"
        tail = f"\t{ns_time(item.time_ns).isoformat()}\totlp\t".encode()
        parts.append(row + copy_json(labels) + tail + hist + b"\n")
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY runs_runmetric ({METRIC_COLUMNS}) FROM STDIN") as copy,
    ):
        copy.write(b"".join(parts))
    return len(parts)


# === Runs of traces ================================================================
# A trace is one run: spans and records that name no run follow the run their trace
# names; runs are created and updated by the run writer (RunQuerySet).


def _new_run(slug: str, at: datetime) -> dict:
    return {"slug": slug, "started_at": at, "status": Run.Status.RUNNING}


def _ensure_runs(project, seeds: dict[str, dict]) -> tuple[dict[str, int], set[str]]:
    """run_id -> Run.pk for every run of `seeds`, creating those not seen before, and
    the run_ids created (written whole: a trace's run often opens and ends in one batch)."""
    created = Run.objects.create_missing(project, seeds)
    found = Run.objects.ids_by_run_id(project, [r for r in seeds if r not in created])
    return {**found, **created}, set(created)


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
