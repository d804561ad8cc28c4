"""What judged items become in our tables: the values of each row, no SQL.

* a log record becomes a `telemetry.ingest.records.Record` (`log_record`), stored as a run
  event by `telemetry.ingest.store.store_records`;
* a span becomes its attributes, events and status message (`span_parts`);
* a data point becomes the labels of a RunMetric (`metric_labels`).

Every item belongs to a run: the one its attributes name (`run_ref`), else the
run of its trace (`trace_run`), else one run per service and UTC day. The tables
and the decisions behind them are in docs/otlp.md.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import orjson
from django.conf import settings

from portal.db import safe_text
from runs.models import LEVEL_ALIASES, run_id_problem
from telemetry.ingest.records import Record, scrub
from telemetry.otlp.items import (
    ELLIPSIS,
    MAX_ATTRIBUTES,
    MAX_LABEL,
    MAX_LIST,
    LogIn,
    PointIn,
    Scope,
    SpanIn,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A log body that reads like an event name (`bd.call`, `session.start`, `prime`).
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,99}")
# Work context (Gas Town): kept in event data under these names, and on the run.
WORK_KEYS = ("work_rig", "work_bead", "work_mol")
# Attributes copied onto the run and into metric labels when the resource has them.
CONTEXT_KEYS = ("service.name", "gt.rig", "gt.role", "gt.agent", *WORK_KEYS)
# Attribute names that carry context, in any of their spellings.
CONTEXT_NAMES = frozenset((*CONTEXT_KEYS, *(f"gt.{key}" for key in WORK_KEYS)))
# RunMetric labels marking a sum's or histogram's temporality and monotonicity.
TEMPORALITY = {1: "delta", 2: "cumulative"}


# --- Values: times, limits, what a scope shares -----------------------------------


def ns_time(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _bounded_value(value: Any, limit: int) -> tuple[Any, bool]:
    if type(value) is str:
        if len(value) > limit:
            return value[: limit - 1] + ELLIPSIS, True
        return value, False
    if type(value) is list:
        cut = len(value) > MAX_LIST
        out = []
        for item in value[:MAX_LIST]:
            item, c = _bounded_value(item, limit)
            cut |= c
            out.append(item)
        return out, cut
    if type(value) is dict:
        out, cut = bounded(value, limit)
        return out, cut
    return value, False


def bounded(attrs: dict, limit: int | None = None) -> tuple[dict, bool]:
    """At most MAX_ATTRIBUTES keys and values of at most `limit` characters, in place.

    Returns the map and whether anything was cut (the caller marks it).
    """
    limit = limit or settings.OTLP_MAX_ATTRIBUTE_LENGTH
    cut = False
    if len(attrs) > MAX_ATTRIBUTES:
        attrs = dict(islice(attrs.items(), MAX_ATTRIBUTES))
        cut = True
    for key, value in attrs.items():
        if type(value) is str:
            if len(value) > limit:
                attrs[key] = value[: limit - 1] + ELLIPSIS
                cut = True
        elif type(value) in (list, dict):
            attrs[key], c = _bounded_value(value, limit)
            cut |= c
    return attrs, cut


def scope_derived(scope: Scope) -> dict:
    """What every item of the scope shares, computed once per scope."""
    derived = scope.derived
    if derived is None:
        resource, _ = bounded(dict(scope.resource))
        scope_attrs, _ = bounded(dict(scope.attrs))
        base = {**resource, **scope_attrs}
        if scope.name:
            base["otel.scope.name"] = scope.name
        if scope.version:
            base["otel.scope.version"] = scope.version
        service = scope.resource.get("service.name")
        pid = scope.resource.get("process.pid")
        host = scope.resource.get("host.name")
        scope.derived = derived = {
            "base": base,
            "service": service[:200] if isinstance(service, str) else "",
            "pid": pid if type(pid) is int and 0 <= pid < 2**31 else None,
            "host": host[:255] if isinstance(host, str) else "",
            "context": context_attributes(dict(base)),
        }
    return derived


# --- Runs: which run an item belongs to ------------------------------------------


def _lookup(keys: list[str], *maps: dict) -> str:
    """The first non-empty string (or integer) value of `keys`, key by key, in `maps` order."""
    for key in keys:
        for attrs in maps:
            value = attrs.get(key)
            if isinstance(value, str):
                value = safe_text(value).strip()
                if value:
                    return value
            elif type(value) is int:
                return str(value)
    return ""


def run_ref(attrs: dict, scope: Scope) -> str:
    """The run an item names by attribute (record, then scope, then resource), or "".

    A name no run can have (too long, holding a `/`) is not a name: the item goes to
    its trace's run or its day run, as if it named none.
    """
    run_id = _lookup(settings.OTLP_RUN_ATTRIBUTES, attrs, scope.attrs, scope.resource)
    return "" if run_id_problem(run_id) else run_id


def run_slug(attrs: dict, scope: Scope) -> str:
    return _lookup(settings.OTLP_SLUG_ATTRIBUTES, attrs, scope.attrs, scope.resource)[:200]


def _day_run(scope: Scope, at: datetime) -> str:
    """The run of items that name none and carry no trace: one per service and UTC day."""
    service = (scope_derived(scope)["service"] or "otel").replace("/", "_")[:100]
    return f"{service}@{at.date().isoformat()}"


def trace_run(trace_id: str) -> str:
    """The run of a trace whose spans and records name no run of their own."""
    return f"trace-{trace_id}"


# --- Context and redaction -------------------------------------------------------


def _plain_work_keys(data: dict) -> None:
    """Work context under its plain names: Gas Town sends `gt.work_rig` on the resource,
    `work_rig` on `prime` records."""
    for key in WORK_KEYS:
        if key not in data and f"gt.{key}" in data:
            data[key] = data[f"gt.{key}"]


def context_attributes(data: dict) -> dict:
    """What of CONTEXT_KEYS an item carries (work keys under their plain names)."""
    _plain_work_keys(data)
    return {
        key: safe_text(str(data[key]))[:MAX_LABEL]
        for key in CONTEXT_KEYS
        if data.get(key) not in (None, "") and isinstance(data[key], (str, int, float, bool))
    }


def clean(data: dict, message: str = "") -> tuple[dict, str]:
    """Redaction and PostgreSQL-safety of run events (records.scrub), for spans and metrics."""
    rec = Record(
        ts=_EPOCH,
        event="otel",
        level="info",
        slug="",
        phase="",
        data=data,
        run_id="",
        seq=None,
        message=message,
        pid=None,
        host="",
        request_id="",
        trace_id="",
        span_id="",
    )
    scrub(None, rec)
    return rec.data, rec.message


# --- Logs -> run events ----------------------------------------------------------

_SEVERITY_LEVELS = ("debug", "debug", "info", "warn", "error", "error")  # per 4 numbers


def _level(number: int, text: str) -> str:
    if 1 <= number <= 24:
        return _SEVERITY_LEVELS[(number - 1) // 4]
    return LEVEL_ALIASES.get(text.strip().lower(), "info") if text else "info"


def log_record(item: LogIn, received: datetime) -> Record:
    """One OTLP log record as a run event (see the table in docs/otlp.md)."""
    scope = item.scope
    derived = scope_derived(scope)
    attrs, cut = bounded(item.attrs)
    data = {**derived["base"], **attrs}
    ns = item.time_ns or item.observed_ns
    ts = ns_time(ns) if ns else received
    body = item.body
    name = attrs.get("event.name")
    if not isinstance(name, str) or not name.strip():
        name = item.event_name
    if not name.strip() and isinstance(body, str) and _NAME_LIKE.fullmatch(body):
        name = body
    name = name.strip()[:200] or "otel.log"
    if isinstance(body, str):
        message = body
    elif body is None:
        message = ""
    else:
        body, c = _bounded_value(body, settings.OTLP_MAX_ATTRIBUTE_LENGTH)
        cut |= c
        data["body"] = body
        message = orjson.dumps(body, default=str).decode()
    if item.severity_text:
        data["otel.severity"] = item.severity_text[:32]
    if item.dropped:
        data["otel.dropped_attributes_count"] = item.dropped
    if cut:
        data["_truncated"] = True
    _plain_work_keys(data)
    run_id = run_ref(item.attrs, scope)
    if not run_id:
        run_id = trace_run(item.trace_id) if item.trace_id else _day_run(scope, ts)
    return Record(
        ts=ts,
        event=name,
        level=_level(item.severity_number, item.severity_text),
        slug=run_slug(item.attrs, scope),
        phase="",
        data=data,
        run_id=run_id,
        seq=None,
        message=message,
        # The resource's process.pid stays in the data: it is the exporting process's,
        # often a short-lived helper, not a promise of the run's life (orphans).
        pid=None,
        host=derived["host"],
        request_id="",
        trace_id=item.trace_id,
        span_id=item.span_id,
    )


# --- Spans and metric points -----------------------------------------------------


def span_parts(item: SpanIn) -> tuple[dict, list, str]:
    attrs, cut = bounded(item.attrs)
    events = []
    for time_ns, name, ev_attrs in item.events:
        ev_attrs, c = bounded(ev_attrs)
        cut |= c
        events.append(
            {"name": name[:200], "time": ns_time(time_ns).isoformat(), "attributes": ev_attrs}
        )
    if item.dropped:
        attrs["otel.dropped_attributes_count"] = item.dropped
    if cut:
        attrs["_truncated"] = True
    data, message = clean({"a": attrs, "e": events}, item.status_message)
    attrs = data["a"]
    if data.get("_truncated"):
        attrs["_truncated"] = True
    return attrs, data["e"], message


def metric_labels(item: PointIn, run_ref_keys: list[str]) -> dict:
    labels, _ = bounded(dict(item.attrs), MAX_LABEL)
    for key in run_ref_keys:  # the run says it; as a label it would split every series
        labels.pop(key, None)
    for key, value in scope_derived(item.scope)["context"].items():
        labels.setdefault(key, value)
    if item.type != "gauge" and item.temporality in TEMPORALITY:
        labels["otel.temporality"] = TEMPORALITY[item.temporality]
        if TEMPORALITY[item.temporality] == "cumulative" and item.start_ns:
            # Part of the series: after a restart the running total starts again from
            # zero, and the totals of both lives count (docs/metrics.md).
            labels["otel.start"] = ns_time(item.start_ns).isoformat()
    if item.monotonic:
        labels["otel.monotonic"] = True
    return labels
