"""OTLP/HTTP logs, metrics and traces: decoding, judging, mapping and storing.

Both encodings become one internal shape (`LogIn`, `SpanIn`, `PointIn`, each
pointing at its `Scope`), so a protobuf body and its OTLP-JSON twin store
identical rows. As for run events, the request decodes and judges every item
(to answer `partial_success` with what was rejected) and spools the raw body;
the worker decodes it again with the same code and stores what was accepted:

* logs become Events through `runs.ingest.store_records` (run resolution,
  redaction, lifecycle, COPY);
* spans are COPYed into a temporary table and moved with
  `INSERT … ON CONFLICT DO NOTHING`, so a retried export stores nothing twice;
* metric points become RunMetric rows (source "otlp"), written with one COPY.

docs/otlp.md has the mapping tables and the decisions behind them.
"""

from __future__ import annotations

import base64
import json as stdlib_json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import islice
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

from runs.ingest import LEVELS, Record, copy_text, safe_text, scrub, store_records
from runs.models import Run

LOGS, METRICS, TRACES = "logs", "metrics", "traces"
BATCH_KIND = {LOGS: "otlp_logs", METRICS: "otlp_metrics", TRACES: "otlp_traces"}

MAX_DEPTH = 32  # nesting of array/kvlist attribute values
MAX_ATTRIBUTES = 128  # per attribute map (record, scope, resource): OTel's default limit
MAX_LIST = 128  # items of an array value, events of a span
MAX_LABEL = 200  # a metric label value
MAX_ERRORS = 5  # distinct reasons named in partial_success.error_message
ELLIPSIS = "…"
TOO_DEEP = "[too deep]"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_NS = 253_402_300_799 * 10**9  # 9999-12-31T23:59:59Z
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_HEX = frozenset("0123456789abcdefABCDEF")
# A log body that reads like an event name (`bd.call`, `session.start`, `prime`).
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,99}")
# Work context (Gas Town): kept in event data under these names, and on the run.
WORK_KEYS = ("work_rig", "work_bead", "work_mol")
# Attributes copied onto the run and into metric labels when the resource has them.
CONTEXT_KEYS = ("service.name", "gt.rig", "gt.role", "gt.agent", *WORK_KEYS)
# Attribute names that carry context, in any of their spellings.
_CONTEXT_NAMES = frozenset((*CONTEXT_KEYS, *(f"gt.{key}" for key in WORK_KEYS)))
# RunMetric labels marking a sum's or histogram's temporality and monotonicity.
TEMPORALITY = {1: "delta", 2: "cumulative"}
_SPAN_KINDS = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_STATUS_CODES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_TEMPORALITIES = {
    "AGGREGATION_TEMPORALITY_UNSPECIFIED": 0,
    "AGGREGATION_TEMPORALITY_DELTA": 1,
    "AGGREGATION_TEMPORALITY_CUMULATIVE": 2,
}
_SEVERITIES = dict(SeverityNumber.items())
_NO_RECORDED_VALUE = 1  # DataPointFlags: a staleness marker, not a measurement

REQUESTS = {
    LOGS: ExportLogsServiceRequest,
    METRICS: ExportMetricsServiceRequest,
    TRACES: ExportTraceServiceRequest,
}
RESPONSES = {
    LOGS: ExportLogsServiceResponse,
    METRICS: ExportMetricsServiceResponse,
    TRACES: ExportTraceServiceResponse,
}
# partial_success field per signal, snake_case (protobuf) and camelCase (JSON).
REJECTED_FIELD = {
    LOGS: ("rejected_log_records", "rejectedLogRecords"),
    METRICS: ("rejected_data_points", "rejectedDataPoints"),
    TRACES: ("rejected_spans", "rejectedSpans"),
}
_NOUN = {LOGS: "log records", METRICS: "data points", TRACES: "spans"}


class OtlpError(Exception):
    """The whole request is unreadable (400): not protobuf or not OTLP JSON."""


class ItemError(ValueError):
    """One log record, span or data point is refused; the others are kept."""


# --- The internal shape -------------------------------------------------------


class Scope:
    """A resource and an instrumentation scope: shared by every item under them."""

    __slots__ = ("resource", "name", "version", "attrs", "_derived")

    def __init__(self, resource: dict, name: str, version: str, attrs: dict):
        self.resource = resource
        self.name = name
        self.version = version
        self.attrs = attrs
        self._derived: dict | None = None

    def derived(self) -> dict:
        """What every item of the scope shares, computed once per scope."""
        if self._derived is None:
            resource, _ = bounded(dict(self.resource))
            scope_attrs, _ = bounded(dict(self.attrs))
            base = {**resource, **scope_attrs}
            if self.name:
                base["otel.scope.name"] = self.name
            if self.version:
                base["otel.scope.version"] = self.version
            service = self.resource.get("service.name")
            pid = self.resource.get("process.pid")
            host = self.resource.get("host.name")
            self._derived = {
                "base": base,
                "service": service[:200] if isinstance(service, str) else "",
                "pid": pid if type(pid) is int and 0 <= pid < 2**31 else None,
                "host": host[:255] if isinstance(host, str) else "",
                "context": _context(dict(base)),
            }
        return self._derived


@dataclass(slots=True)
class LogIn:
    scope: Scope
    time_ns: int
    observed_ns: int
    severity_number: int
    severity_text: str
    body: Any
    attrs: dict
    dropped: int
    trace_id: str
    span_id: str
    event_name: str


@dataclass(slots=True)
class SpanIn:
    scope: Scope
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attrs: dict
    dropped: int
    events: list  # [(time_ns, name, attrs)]
    status_code: int
    status_message: str


@dataclass(slots=True)
class PointIn:
    scope: Scope
    name: str
    unit: str
    type: str  # "sum", "gauge", "histogram"
    temporality: int  # 0 unspecified, 1 delta, 2 cumulative
    monotonic: bool
    attrs: dict
    time_ns: int
    value: float
    histogram: dict | None
    # When a cumulative series (re)started: a restarted process starts a new series.
    start_ns: int = 0


@dataclass
class Decoded:
    """Accepted items of one request and what was refused, with the reasons."""

    signal: str
    items: list
    rejected: int = 0
    reasons: dict[str, int] | None = None

    def reject(self, reason: str) -> None:
        self.rejected += 1
        reasons = self.reasons if self.reasons is not None else {}
        self.reasons = reasons
        if reason in reasons or len(reasons) < MAX_ERRORS:
            reasons[reason] = reasons.get(reason, 0) + 1

    @property
    def error_message(self) -> str:
        if not self.rejected:
            return ""
        parts = [f"{reason} ({n}x)" if n > 1 else reason for reason, n in self.reasons.items()]
        total = self.rejected + len(self.items)
        return f"rejected {self.rejected} of {total} {_NOUN[self.signal]}: " + "; ".join(parts)


def decode(signal: str, body: bytes, json: bool, full: bool = True) -> Decoded:
    """Decode and judge one request body. Raises OtlpError when it is unreadable.

    `full=False` (the request, which only counts) skips converting protobuf attribute
    values: any protobuf AnyValue converts, so the verdicts are the same. JSON is
    always walked in full, as a malformed attribute refuses its item.
    """
    if json:
        try:
            data = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            # orjson refuses integers beyond 64 bits, invalid UTF-8 and lone surrogates;
            # the stdlib parser takes them (items then judge the values, scrub cleans).
            try:
                data = stdlib_json.loads(body.decode("utf-8", "replace"))
            except (ValueError, RecursionError) as exc:
                raise OtlpError(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise OtlpError("body must be a JSON object (an Export*ServiceRequest)")
        return _JSON_DECODERS[signal](data)
    try:
        request = REQUESTS[signal].FromString(body)
    except (DecodeError, RecursionError) as exc:
        raise OtlpError(
            f"body is not a valid protobuf {REQUESTS[signal].__name__}: {exc}"
        ) from None
    return _PB_DECODERS[signal](request, _pb_attrs if full else _no_attrs)


# --- Judging: the same rules for both encodings --------------------------------


def _check_id(value: str, size: int, what: str) -> str:
    """A hex id of `size` bytes, or "" when absent (all zeros is absent, too)."""
    if not value:
        return ""
    if len(value) != 2 * size:
        raise ItemError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(value)}")
    return "" if value == "0" * (2 * size) else value


def _check_time(ns: int, what: str) -> int:
    if not 0 <= ns <= _MAX_NS:
        raise ItemError(f"{what} out of range")
    return ns


def _judge_log(item: LogIn) -> LogIn:
    item.trace_id = _check_id(item.trace_id, 16, "trace_id")
    item.span_id = _check_id(item.span_id, 8, "span_id")
    _check_time(item.time_ns, "time_unix_nano")
    _check_time(item.observed_ns, "observed_time_unix_nano")
    return item


def _judge_span(item: SpanIn) -> SpanIn:
    if not _check_id(item.trace_id, 16, "trace_id"):
        raise ItemError("span without a valid trace_id")
    if not _check_id(item.span_id, 8, "span_id"):
        raise ItemError("span without a valid span_id")
    item.parent_span_id = _check_id(item.parent_span_id, 8, "parent_span_id")
    if not item.start_ns:
        raise ItemError("span without start_time_unix_nano")
    _check_time(item.start_ns, "start_time_unix_nano")
    _check_time(item.end_ns, "end_time_unix_nano")
    if item.end_ns < item.start_ns:  # unfinished or clock skew: a zero-length span
        item.end_ns = item.start_ns
    if not 0 <= item.kind <= 5:
        item.kind = 0
    if not 0 <= item.status_code <= 2:
        item.status_code = 0
    for time_ns, _, _ in item.events:
        _check_time(time_ns, "event time_unix_nano")
    return item


def _finite(value: float, what: str) -> float:
    if math.isnan(value) or math.isinf(value):
        raise ItemError(f"{what} is NaN or infinite")
    return value


def _judge_point(item: PointIn) -> PointIn:
    if not item.name:
        raise ItemError("metric without a name")
    if not item.time_ns:
        raise ItemError("data point without time_unix_nano")
    _check_time(item.time_ns, "time_unix_nano")
    _check_time(item.start_ns, "start_time_unix_nano")
    _finite(item.value, "value")
    hist = item.histogram
    if hist is not None:
        bounds, counts = hist["bounds"], hist["counts"]
        if counts and len(counts) != len(bounds) + 1:
            raise ItemError("histogram bucket_counts must have one more entry than explicit_bounds")
        for bound in bounds:
            _finite(bound, "histogram bound")
        if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ItemError("histogram explicit_bounds must increase")
        if counts and sum(counts) != hist["count"]:
            raise ItemError("histogram count is not the sum of bucket_counts")
        for key in ("min", "max"):
            if hist[key] is not None:
                _finite(hist[key], f"histogram {key}")
    return item


# --- Protobuf ----------------------------------------------------------------


def _pb_value(value, depth: int) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return None
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        return value.double_value
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if depth >= MAX_DEPTH:
        return TOO_DEEP
    if kind == "array_value":
        return [_pb_value(v, depth + 1) for v in value.array_value.values]
    return {kv.key: _pb_value(kv.value, depth + 1) for kv in value.kvlist_value.values}


def _pb_attrs(kvs) -> dict:
    return {kv.key: _pb_value(kv.value, 0) for kv in kvs}


def _no_attrs(kvs) -> dict:
    return {}


def _pb_scopes(resource_items, items_field: str, scope_field: str, attrs=_pb_attrs):
    """(Scope, items) per scope of every resource of a request."""
    for rg in resource_items:
        resource = attrs(rg.resource.attributes)
        for sg in getattr(rg, scope_field):
            sc = sg.scope
            scope = Scope(resource, sc.name, sc.version, attrs(sc.attributes))
            yield scope, getattr(sg, items_field)


def _pb_logs(request, attrs=_pb_attrs) -> Decoded:
    out = Decoded(LOGS, [])
    append = out.items.append
    full = attrs is _pb_attrs
    for scope, records in _pb_scopes(request.resource_logs, "log_records", "scope_logs", attrs):
        for lr in records:
            try:
                item = LogIn(
                    scope,
                    lr.time_unix_nano,
                    lr.observed_time_unix_nano,
                    lr.severity_number,
                    lr.severity_text,
                    _pb_value(lr.body, 0) if full and lr.HasField("body") else None,
                    attrs(lr.attributes),
                    lr.dropped_attributes_count,
                    lr.trace_id.hex(),
                    lr.span_id.hex(),
                    lr.event_name,
                )
                append(_judge_log(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _pb_spans(request, attrs=_pb_attrs) -> Decoded:
    out = Decoded(TRACES, [])
    append = out.items.append
    for scope, spans in _pb_scopes(request.resource_spans, "spans", "scope_spans", attrs):
        for sp in spans:
            try:
                events = [
                    (ev.time_unix_nano, ev.name, attrs(ev.attributes))
                    for ev in islice(sp.events, MAX_LIST)
                ]
                item = SpanIn(
                    scope,
                    sp.trace_id.hex(),
                    sp.span_id.hex(),
                    sp.parent_span_id.hex(),
                    sp.name,
                    sp.kind,
                    sp.start_time_unix_nano,
                    sp.end_time_unix_nano,
                    attrs(sp.attributes),
                    sp.dropped_attributes_count,
                    events,
                    sp.status.code,
                    sp.status.message,
                )
                append(_judge_span(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _pb_metrics(request, attrs=_pb_attrs) -> Decoded:
    out = Decoded(METRICS, [])
    append = out.items.append
    for scope, metrics in _pb_scopes(request.resource_metrics, "metrics", "scope_metrics", attrs):
        for metric in metrics:
            kind = metric.WhichOneof("data")
            if kind is None:
                continue
            data = getattr(metric, kind)
            if kind in ("exponential_histogram", "summary"):
                for _ in data.data_points:
                    out.reject(_unsupported(kind))
                continue
            temporality = getattr(data, "aggregation_temporality", 0)
            monotonic = kind == "sum" and data.is_monotonic
            for dp in data.data_points:
                if dp.flags & _NO_RECORDED_VALUE:
                    continue
                try:
                    if kind == "histogram":
                        hist = {
                            "bounds": list(dp.explicit_bounds),
                            "counts": list(dp.bucket_counts),
                            "sum": dp.sum if dp.HasField("sum") else None,
                            "count": dp.count,
                            "min": dp.min if dp.HasField("min") else None,
                            "max": dp.max if dp.HasField("max") else None,
                        }
                        value = hist["sum"] or 0.0
                    else:
                        hist = None
                        which = dp.WhichOneof("value")
                        if which is None:
                            raise ItemError("data point without a value")
                        value = float(getattr(dp, which))
                    item = PointIn(
                        scope,
                        metric.name,
                        metric.unit,
                        kind,
                        temporality,
                        monotonic,
                        attrs(dp.attributes),
                        dp.time_unix_nano,
                        value,
                        hist,
                        dp.start_time_unix_nano,
                    )
                    append(_judge_point(item))
                except ItemError as exc:
                    out.reject(str(exc))
    return out


def _unsupported(kind: str) -> str:
    if kind == "exponential_histogram":
        return (
            "exponential histograms are not supported: configure explicit bucket "
            "histograms (the SDK default)"
        )
    return "summary data points are not supported: send histograms"


_PB_DECODERS = {LOGS: _pb_logs, METRICS: _pb_metrics, TRACES: _pb_spans}


# --- OTLP JSON ------------------------------------------------------------------
# Walked by hand: json_format.Parse reads hex ids as base64 and is slow. Keys are
# lowerCamelCase, enums integers, 64-bit integers strings or numbers, unknown
# fields ignored. Problems inside an item refuse the item; problems in the
# envelope around items refuse the request.


def _j_list(obj: dict, key: str, error: type[Exception] = OtlpError) -> list:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise error(f"{key}: must be an array")
    return value


def _j_obj(obj: dict, key: str, error: type[Exception] = OtlpError) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"{key}: must be an object")
    return value


def _j_str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ItemError(f"{key}: must be a string")
    return value


def _j_int(value: Any, what: str, signed: bool = False) -> int:
    if type(value) is int:
        number = value
    elif type(value) is str:
        try:
            number = int(value)
        except ValueError:
            raise ItemError(f"{what}: not an integer") from None
    elif type(value) is float and value.is_integer():
        number = int(value)
    elif value is None:
        return 0
    else:
        raise ItemError(f"{what}: not an integer")
    low, high = (-(2**63), 2**63) if signed else (0, 2**64)
    if not low <= number < high:
        raise ItemError(f"{what}: out of range")
    return number


def _j_float(value: Any, what: str) -> float:
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:  # "NaN", "Infinity", "-Infinity" or a number as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ItemError(f"{what}: not a number")


def _j_enum(value: Any, names: dict[str, int], what: str) -> int:
    if type(value) is int:
        return value
    if value is None:
        return 0
    if isinstance(value, str) and value in names:
        return names[value]
    raise ItemError(f"{what}: not an enum value")


def _j_hex(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not value:
        return ""
    if not isinstance(value, str) or not _HEX.issuperset(value):
        raise ItemError(f"{key}: must be a hex string")
    return value.lower()


def _j_value(value: Any, depth: int) -> Any:
    if not isinstance(value, dict):
        if value is None:
            return None
        raise ItemError("attribute value: must be an AnyValue object")
    if "stringValue" in value:
        text = value["stringValue"]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise ItemError("stringValue: must be a string")
        return text
    if "intValue" in value:
        return _j_int(value["intValue"], "intValue", signed=True)
    if "boolValue" in value:
        flag = value["boolValue"]
        if not isinstance(flag, bool):
            raise ItemError("boolValue: must be true or false")
        return flag
    if "doubleValue" in value:
        return _j_float(value["doubleValue"], "doubleValue")
    if "bytesValue" in value:
        raw = value["bytesValue"]
        if not isinstance(raw, str):
            raise ItemError("bytesValue: must be a base64 string")
        return raw
    if "arrayValue" in value:
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        items = _j_list(_j_obj(value, "arrayValue", ItemError), "values", ItemError)
        return [_j_value(v, depth + 1) for v in items]
    if "kvlistValue" in value:
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        items = _j_list(_j_obj(value, "kvlistValue", ItemError), "values", ItemError)
        return _j_attrs(items, depth + 1)
    return None


def _j_attrs(kvs: list, depth: int = 0) -> dict:
    out = {}
    for kv in kvs:
        if not isinstance(kv, dict):
            raise ItemError("attribute: must be a {key, value} object")
        key = kv.get("key") or ""
        if not isinstance(key, str):
            raise ItemError("attribute key: must be a string")
        out[key] = _j_value(kv.get("value"), depth)
    return out


def _j_scopes(data: dict, resource_key: str, scope_key: str, items_key: str):
    """(Scope or ItemError, items) per scope of every resource of a request."""
    for rg in _j_list(data, resource_key):
        if not isinstance(rg, dict):
            raise OtlpError(f"{resource_key}: items must be objects")
        resource_obj = _j_obj(rg, "resource")
        for sg in _j_list(rg, scope_key):
            if not isinstance(sg, dict):
                raise OtlpError(f"{scope_key}: items must be objects")
            items = _j_list(sg, items_key)
            try:
                # Bad attributes of a resource or scope refuse the items under it.
                sc = _j_obj(sg, "scope", ItemError)
                scope: Scope | ItemError = Scope(
                    _j_attrs(_j_list(resource_obj, "attributes", ItemError)),
                    _j_str(sc, "name"),
                    _j_str(sc, "version"),
                    _j_attrs(_j_list(sc, "attributes", ItemError)),
                )
            except ItemError as exc:
                scope = exc
            yield scope, items


def _j_logs(data: dict) -> Decoded:
    out = Decoded(LOGS, [])
    append = out.items.append
    for scope, records in _j_scopes(data, "resourceLogs", "scopeLogs", "logRecords"):
        for lr in records:
            try:
                if isinstance(scope, ItemError):
                    raise scope
                if not isinstance(lr, dict):
                    raise ItemError("log record: must be an object")
                item = LogIn(
                    scope,
                    _j_int(lr.get("timeUnixNano"), "timeUnixNano"),
                    _j_int(lr.get("observedTimeUnixNano"), "observedTimeUnixNano"),
                    _j_enum(lr.get("severityNumber"), _SEVERITIES, "severityNumber"),
                    _j_str(lr, "severityText"),
                    _j_value(lr.get("body"), 0),
                    _j_attrs(_j_list(lr, "attributes", ItemError)),
                    _j_int(lr.get("droppedAttributesCount"), "droppedAttributesCount"),
                    _j_hex(lr, "traceId"),
                    _j_hex(lr, "spanId"),
                    _j_str(lr, "eventName"),
                )
                append(_judge_log(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _j_spans(data: dict) -> Decoded:
    out = Decoded(TRACES, [])
    append = out.items.append
    for scope, spans in _j_scopes(data, "resourceSpans", "scopeSpans", "spans"):
        for sp in spans:
            try:
                if isinstance(scope, ItemError):
                    raise scope
                if not isinstance(sp, dict):
                    raise ItemError("span: must be an object")
                events = []
                for ev in islice(_j_list(sp, "events", ItemError), MAX_LIST):
                    if not isinstance(ev, dict):
                        raise ItemError("span event: must be an object")
                    events.append(
                        (
                            _j_int(ev.get("timeUnixNano"), "event timeUnixNano"),
                            _j_str(ev, "name"),
                            _j_attrs(_j_list(ev, "attributes", ItemError)),
                        )
                    )
                status = _j_obj(sp, "status", ItemError)
                item = SpanIn(
                    scope,
                    _j_hex(sp, "traceId"),
                    _j_hex(sp, "spanId"),
                    _j_hex(sp, "parentSpanId"),
                    _j_str(sp, "name"),
                    _j_enum(sp.get("kind"), _SPAN_KINDS, "kind"),
                    _j_int(sp.get("startTimeUnixNano"), "startTimeUnixNano"),
                    _j_int(sp.get("endTimeUnixNano"), "endTimeUnixNano"),
                    _j_attrs(_j_list(sp, "attributes", ItemError)),
                    _j_int(sp.get("droppedAttributesCount"), "droppedAttributesCount"),
                    events,
                    _j_enum(status.get("code"), _STATUS_CODES, "status.code"),
                    _j_str(status, "message"),
                )
                append(_judge_span(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


_J_KINDS = (
    ("sum", "sum"),
    ("gauge", "gauge"),
    ("histogram", "histogram"),
    ("exponentialHistogram", "exponential_histogram"),
    ("summary", "summary"),
)


def _j_point(scope: Scope, metric: dict, kind: str, data: dict, dp: Any) -> PointIn | None:
    if not isinstance(dp, dict):
        raise ItemError("data point: must be an object")
    if _j_int(dp.get("flags"), "flags") & _NO_RECORDED_VALUE:
        return None
    if kind == "histogram":
        raw_sum, raw_min, raw_max = dp.get("sum"), dp.get("min"), dp.get("max")
        hist = {
            "bounds": [
                _j_float(b, "explicitBounds") for b in _j_list(dp, "explicitBounds", ItemError)
            ],
            "counts": [_j_int(c, "bucketCounts") for c in _j_list(dp, "bucketCounts", ItemError)],
            "sum": None if raw_sum is None else _j_float(raw_sum, "sum"),
            "count": _j_int(dp.get("count"), "count"),
            "min": None if raw_min is None else _j_float(raw_min, "min"),
            "max": None if raw_max is None else _j_float(raw_max, "max"),
        }
        value = hist["sum"] or 0.0
    else:
        hist = None
        if "asDouble" in dp:
            value = _j_float(dp["asDouble"], "asDouble")
        elif "asInt" in dp:
            value = float(_j_int(dp["asInt"], "asInt", signed=True))
        else:
            raise ItemError("data point without a value")
    name = metric.get("name")
    unit = metric.get("unit")
    return PointIn(
        scope,
        name if isinstance(name, str) else "",
        unit if isinstance(unit, str) else "",
        kind,
        _j_enum(data.get("aggregationTemporality"), _TEMPORALITIES, "aggregationTemporality"),
        kind == "sum" and data.get("isMonotonic") is True,
        _j_attrs(_j_list(dp, "attributes", ItemError)),
        _j_int(dp.get("timeUnixNano"), "timeUnixNano"),
        value,
        hist,
        _j_int(dp.get("startTimeUnixNano"), "startTimeUnixNano"),
    )


def _j_metrics(data: dict) -> Decoded:
    out = Decoded(METRICS, [])
    append = out.items.append
    for scope, metrics in _j_scopes(data, "resourceMetrics", "scopeMetrics", "metrics"):
        for metric in metrics:
            if not isinstance(metric, dict):
                out.reject("metric: must be an object")
                continue
            found = next(((k, t) for k, t in _J_KINDS if metric.get(k) is not None), None)
            if found is None:
                continue  # a metric without data: nothing to store, nothing refused
            key, kind = found
            body = metric[key]
            points = body.get("dataPoints") if isinstance(body, dict) else None
            if not isinstance(points, list):
                out.reject(f"{key}.dataPoints: must be an array")
                continue
            if kind in ("exponential_histogram", "summary"):
                for _ in points:
                    out.reject(_unsupported(kind))
                continue
            for dp in points:
                try:
                    if isinstance(scope, ItemError):
                        raise scope
                    item = _j_point(scope, metric, kind, body, dp)
                    if item is not None:
                        append(_judge_point(item))
                except ItemError as exc:
                    out.reject(str(exc))
    return out


_JSON_DECODERS = {LOGS: _j_logs, METRICS: _j_metrics, TRACES: _j_spans}


# --- Answers ------------------------------------------------------------------


def response_body(signal: str, decoded: Decoded | None, json: bool) -> bytes:
    """The Export*ServiceResponse: empty, or with partial_success when items were refused."""
    if decoded is None or not decoded.rejected:
        return b"{}" if json else b""
    snake, camel = REJECTED_FIELD[signal]
    message = decoded.error_message[:2000]
    if json:
        # The proto3 JSON form: int64 as a string.
        partial = {camel: str(decoded.rejected), "errorMessage": message}
        return orjson.dumps({"partialSuccess": partial})
    answer = RESPONSES[signal]()
    setattr(answer.partial_success, snake, decoded.rejected)
    answer.partial_success.error_message = message
    return answer.SerializeToString()


# --- Mapping helpers --------------------------------------------------------------


def _ns_time(ns: int) -> datetime:
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


def _run_ref(attrs: dict, scope: Scope) -> str:
    """The run an item names by attribute (record, then scope, then resource), or ""."""
    run_id = _lookup(settings.OTLP_RUN_ATTRIBUTES, attrs, scope.attrs, scope.resource)
    return run_id if len(run_id) <= 128 else ""


def _slug(attrs: dict, scope: Scope) -> str:
    return _lookup(settings.OTLP_SLUG_ATTRIBUTES, attrs, scope.attrs, scope.resource)[:200]


def _day_run(scope: Scope, at: datetime) -> str:
    """The run of items that name none and carry no trace: one per service and UTC day."""
    service = (scope.derived()["service"] or "otel").replace("/", "_")[:100]
    return f"{service}@{at.date().isoformat()}"


def _plain_work_keys(data: dict) -> None:
    """Work context under its plain names: Gas Town sends `gt.work_rig` on the resource,
    `work_rig` on `prime` records."""
    for key in WORK_KEYS:
        if key not in data and f"gt.{key}" in data:
            data[key] = data[f"gt.{key}"]


def _context(data: dict) -> dict:
    """What of CONTEXT_KEYS an item carries (work keys under their plain names)."""
    _plain_work_keys(data)
    return {
        key: safe_text(str(data[key]))[:MAX_LABEL]
        for key in CONTEXT_KEYS
        if data.get(key) not in (None, "") and isinstance(data[key], (str, int, float, bool))
    }


def _clean(data: dict, message: str = "") -> tuple[dict, str]:
    """Redaction and PostgreSQL-safety of runs.ingest.scrub, for spans and metrics."""
    rec = Record(_EPOCH, "otel", "info", "", "", data, "", None, message, None, "", "", "", "")
    scrub(None, rec)
    return rec.data, rec.message


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


def _trace_run(trace_id: str) -> str:
    """The run of a trace whose spans and records name no run of their own."""
    return f"trace-{trace_id}"


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
    synthetic = {_trace_run(trace): run_pks[run] for trace, run in named.items()}
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


def _copy_json(value: Any) -> bytes:
    # JSON escapes control characters itself; COPY needs its backslashes doubled.
    return orjson.dumps(value, default=str).replace(b"\\", b"\\\\")


# --- Logs -> Events ----------------------------------------------------------------

_SEVERITY_LEVELS = ("debug", "debug", "info", "warn", "error", "error")  # per 4 numbers


def _level(number: int, text: str) -> str:
    if 1 <= number <= 24:
        return _SEVERITY_LEVELS[(number - 1) // 4]
    return LEVELS.get(text.strip().lower(), "info") if text else "info"


def log_record(item: LogIn, received: datetime) -> Record:
    """One OTLP log record as a run event (see the table in docs/otlp.md)."""
    scope = item.scope
    derived = scope.derived()
    attrs, cut = bounded(item.attrs)
    data = {**derived["base"], **attrs}
    ns = item.time_ns or item.observed_ns
    ts = _ns_time(ns) if ns else received
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
    run_id = _run_ref(item.attrs, scope)
    if not run_id:
        run_id = _trace_run(item.trace_id) if item.trace_id else _day_run(scope, ts)
    return Record(
        ts,
        name,
        _level(item.severity_number, item.severity_text),
        _slug(item.attrs, scope),
        "",
        data,
        run_id,
        None,
        message,
        derived["pid"],
        derived["host"],
        "",
        item.trace_id,
        item.span_id,
    )


def store_logs_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /v1/logs` body as run events; returns the events stored."""
    decoded = decode(LOGS, body, batch.params.get("encoding") == "json")
    records = [log_record(item, batch.received_at) for item in decoded.items]
    if not records:
        return 0
    # Records that name no run follow the run their trace's spans (or records) name.
    refs = [
        "" if rec.trace_id and rec.run_id == _trace_run(rec.trace_id) else rec.run_id
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
        attrs = _context(rec.data)
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


def _span_parts(item: SpanIn) -> tuple[dict, list, str]:
    attrs, cut = bounded(item.attrs)
    events = []
    for time_ns, name, ev_attrs in item.events:
        ev_attrs, c = bounded(ev_attrs)
        cut |= c
        events.append(
            {"name": name[:200], "time": _ns_time(time_ns).isoformat(), "attributes": ev_attrs}
        )
    if item.dropped:
        attrs["otel.dropped_attributes_count"] = item.dropped
    if cut:
        attrs["_truncated"] = True
    data, message = _clean({"a": attrs, "e": events}, item.status_message)
    attrs = data["a"]
    if data.get("_truncated"):
        attrs["_truncated"] = True
    return attrs, data["e"], message


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
    refs: list[str] = [_run_ref(item.attrs, item.scope) for item in decoded.items]
    named = _named_trace_runs(project, decoded.items, refs)
    spans: list[tuple] = []
    runs: dict[str, dict] = {}
    for i, item in enumerate(decoded.items):
        run_id = refs[i] = refs[i] or named.get(item.trace_id) or _trace_run(item.trace_id)
        start, end = _ns_time(item.start_ns), _ns_time(item.end_ns)
        attrs, events, status_message = _span_parts(item)
        spans.append((start, end, attrs, events, status_message))
        run = runs.get(run_id)
        if run is None:
            runs[run_id] = run = _new_run(_slug(item.attrs, item.scope), start)
            run["last_event_at"], run["attributes"] = end, {}
        run["started_at"], run["last_event_at"] = (
            min(run["started_at"], start),
            max(run["last_event_at"], end),
        )
        if not item.parent_span_id and run_id == _trace_run(item.trace_id):
            run["finish"] = "failed" if item.status_code == 2 else "succeeded"
            run["end"] = end
        run["attributes"].update(item.scope.derived()["context"])
        if not _CONTEXT_NAMES.isdisjoint(attrs):  # the span's own context wins
            run["attributes"].update(_context({**item.scope.derived()["base"], **attrs}))
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
            resource, _ = _clean(bounded(dict(scope.resource))[0])
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
                copy_text(scope.derived()["service"]),
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


# --- Metrics -> RunMetric ----------------------------------------------------------

METRIC_COLUMNS = "project_id, run_id, name, value, unit, labels, recorded_at, source, histogram"


def _labels(item: PointIn, run_ref_keys: list[str]) -> dict:
    labels, _ = bounded(dict(item.attrs), MAX_LABEL)
    for key in run_ref_keys:  # the run says it; as a label it would split every series
        labels.pop(key, None)
    for key, value in item.scope.derived()["context"].items():
        labels.setdefault(key, value)
    if item.type != "gauge" and item.temporality in TEMPORALITY:
        labels["otel.temporality"] = TEMPORALITY[item.temporality]
        if TEMPORALITY[item.temporality] == "cumulative" and item.start_ns:
            # Part of the series: after a restart the running total starts again from
            # zero, and the totals of both lives count (docs/metrics.md).
            labels["otel.start"] = _ns_time(item.start_ns).isoformat()
    if item.monotonic:
        labels["otel.monotonic"] = True
    return labels


def store_metrics_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /v1/metrics` body as RunMetric rows; returns the rows stored."""
    decoded = decode(METRICS, body, batch.params.get("encoding") == "json")
    if not decoded.items:
        return 0
    project = batch.project
    refs = [_run_ref(item.attrs, item.scope) for item in decoded.items]
    wanted: dict[str, dict] = {}
    for item, run_id in zip(decoded.items, refs, strict=True):
        if run_id and run_id not in wanted:
            wanted[run_id] = _new_run(_slug(item.attrs, item.scope), _ns_time(item.time_ns))
    run_pks, _ = _ensure_runs(project, wanted)
    keys = settings.OTLP_RUN_ATTRIBUTES
    parts: list[bytes] = []
    for item, run_id in zip(decoded.items, refs, strict=True):
        labels, _ = _clean(_labels(item, keys))
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
        tail = f"\t{_ns_time(item.time_ns).isoformat()}\totlp\t".encode()
        parts.append(row + _copy_json(labels) + tail + hist + b"\n")
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY runs_runmetric ({METRIC_COLUMNS}) FROM STDIN") as copy,
    ):
        copy.write(b"".join(parts))
    return len(parts)
