"""The worker's half of Sentry ingestion: one spooled envelope (or `/store/` event) in.

`event` items become error reports, grouped (telemetry/sentry/events.py and
grouping.py) and linked to their run; `transaction` items become spans; every other
item type is counted per project (EnvelopeItemCount, shown on /status) and skipped.
An event id already stored for the project is stored once (a resent envelope, an
SDK retrying).
"""

from __future__ import annotations

import uuid

import orjson
from django.db import connection
from django.utils import timezone

from runs.models import Project, Run
from telemetry import errors
from telemetry.models import ErrorReport, IngestBatch
from telemetry.otlp.store import store_spans
from telemetry.sentry import envelope as envelopes
from telemetry.sentry import events as sentry_events
from telemetry.sentry.transactions import spans_of


def store_envelope(batch: IngestBatch, body: bytes) -> int:
    """Store a spooled Sentry body; returns the error reports and spans new to us."""
    return store_envelopes([(batch, body)])[0]


def store_envelopes(batches: list[tuple[IngestBatch, bytes]]) -> list[int]:
    """Store several spooled Sentry bodies in the worker's transaction, the statements
    shared per project (SDKs send one event a request); returns what each stored."""
    stored = [0] * len(batches)
    by_project: dict[int, list[int]] = {}
    parsed = []
    for n, (batch, body) in enumerate(batches):
        parsed.append(_items_of(batch, body))
        by_project.setdefault(batch.project_id, []).append(n)
    for numbers in by_project.values():
        project = batches[numbers[0]][0].project
        events = [(n, event) for n in numbers for event in parsed[n][0]]
        for n in _store_events(project, {n: batches[n][0] for n in numbers}, events):
            stored[n] += 1
        # One call for every transaction's spans. It counts the spans new to us (a
        # resent envelope's are not): credited to the batches in order.
        new_spans = store_spans(project, [span for n in numbers for span in parsed[n][1]])
        for n in numbers:
            stored[n] += min(len(parsed[n][1]), new_spans)
            new_spans -= min(len(parsed[n][1]), new_spans)
        skipped: dict[str, int] = {}
        for n in numbers:
            for kind, count in parsed[n][2].items():
                skipped[kind] = skipped.get(kind, 0) + count
        _count_skipped(project, skipped)
    return stored


def _items_of(batch: IngestBatch, body: bytes) -> tuple[list[dict], list, dict[str, int]]:
    """The normalized events, the spans of the transactions, and the skipped item
    types of one spooled body."""
    header_id = None
    if batch.params.get("store"):
        items = [("event", orjson.loads(body))]
    else:
        envelope = envelopes.parse(body)
        header_id = envelope.headers.get("event_id")
        items = []
        for item in envelope.items:
            if item.type in ("event", "transaction"):
                items.append((item.type, item.json()))
            else:
                items.append((item.type, None))
    answered_id = batch.params.get("event_id")
    found, spans, skipped = [], [], {}
    for kind, payload in items:
        if kind == "event":
            event = sentry_events.normalized(payload)
            if not _valid_id(event.get("event_id")):
                # The id the request answered goes to the first event that has none.
                event["event_id"] = _valid_id(header_id) or answered_id or uuid.uuid4().hex
                header_id = answered_id = None
            found.append(event)
        elif kind == "transaction":
            spans.extend(spans_of(payload))
        else:
            skipped[kind[:64]] = skipped.get(kind[:64], 0) + 1
    return found, spans, skipped


def _store_events(
    project: Project, batches: dict[int, IngestBatch], found: list[tuple[int, dict]]
) -> list[int]:
    """Store the events of a project's batches new to us (`found`: (batch number,
    event), numbers as in `batches`); returns the batch number of each event stored."""
    unique: dict[str, tuple[int, dict]] = {}
    for n, event in found:
        unique.setdefault(event["event_id"], (n, event))
    if not unique:
        return []
    stored_before = set(
        ErrorReport.objects.filter(project=project, event_id__in=list(unique)).values_list(
            "event_id", flat=True
        )
    )
    new = [pair for event_id, pair in unique.items() if event_id not in stored_before]
    runs = _runs_of(project, [event for _, event in new])
    occurrences = []
    for n, event in new:
        batch = batches[n]
        occurrences.append(
            sentry_events.occurrence(
                event,
                received_at=batch.received_at,
                request_id=batch.request_id,
                run_id=runs.get(event["event_id"]),
                client_address=batch.params.get("client", ""),
            )
        )
    errors.store(project, occurrences)
    return [n for n, _ in new]


_TRACE_RUNS = """
SELECT DISTINCT ON (trace_id) trace_id, run_id FROM telemetry_span
WHERE project_id = %s AND trace_id = ANY(%s) AND run_id IS NOT NULL
ORDER BY trace_id, id
"""


def _runs_of(project: Project, events: list[dict]) -> dict[str, int]:
    """event id -> Run.pk: the run a `run_id` tag names (GitTinkerer's payload), else the
    run of the event's trace (its spans were stored first)."""
    named = {e["event_id"]: e.get("tags", {}).get("run_id") for e in events}
    named = {event_id: run_id for event_id, run_id in named.items() if run_id}
    by_run_id = Run.objects.ids_by_run_id(project, set(named.values()))
    runs = {eid: by_run_id[rid] for eid, rid in named.items() if rid in by_run_id}
    traces = {}
    for event in events:
        if event["event_id"] in runs:
            continue
        trace = event.get("contexts", {}).get("trace")
        trace_id = trace.get("trace_id") if isinstance(trace, dict) else None
        if isinstance(trace_id, str) and trace_id:
            traces[event["event_id"]] = trace_id.replace("-", "").lower()
    if traces:
        with connection.cursor() as cursor:
            cursor.execute(_TRACE_RUNS, [project.pk, sorted(set(traces.values()))])
            of_trace = dict(cursor.fetchall())
        runs.update({eid: of_trace[t] for eid, t in traces.items() if t in of_trace})
    return runs


_COUNT_SKIPPED = """
INSERT INTO telemetry_envelopeitemcount (project_id, item_type, count, last_seen)
SELECT %s, t, n, %s FROM unnest(%s::text[], %s::bigint[]) AS v(t, n) ORDER BY t
ON CONFLICT (project_id, item_type) DO UPDATE
SET count = telemetry_envelopeitemcount.count + excluded.count, last_seen = excluded.last_seen
"""


def _count_skipped(project: Project, skipped: dict[str, int]) -> None:
    if not skipped:
        return
    kinds = sorted(skipped)
    with connection.cursor() as cursor:
        cursor.execute(
            _COUNT_SKIPPED, [project.pk, timezone.now(), kinds, [skipped[k] for k in kinds]]
        )


def _valid_id(value) -> str | None:
    if isinstance(value, str):
        text = value.replace("-", "").lower()
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
    return None
