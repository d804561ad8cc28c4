"""The protobuf decoder: an Export*ServiceRequest into judged items (items.py).

`full=False` (the request, which only counts) skips converting attribute values:
any protobuf AnyValue converts, so the verdicts are the same.
"""

from __future__ import annotations

import base64
from itertools import islice
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from telemetry.otlp.items import (
    LOGS,
    MAX_DEPTH,
    MAX_LIST,
    METRICS,
    NO_RECORDED_VALUE,
    TOO_DEEP,
    TRACES,
    Decoded,
    ItemError,
    LogIn,
    OtlpError,
    PointIn,
    Scope,
    SpanIn,
    judge_log,
    judge_point,
    judge_span,
    unsupported_reason,
)

REQUESTS = {
    LOGS: ExportLogsServiceRequest,
    METRICS: ExportMetricsServiceRequest,
    TRACES: ExportTraceServiceRequest,
}


def decode(signal: str, body: bytes, full: bool = True) -> Decoded:
    """Decode and judge one protobuf body. Raises OtlpError when it is unreadable."""
    try:
        request = REQUESTS[signal].FromString(body)
    except (DecodeError, RecursionError) as exc:
        raise OtlpError(
            f"body is not a valid protobuf {REQUESTS[signal].__name__}: {exc}"
        ) from None
    return _DECODERS[signal](request, _attributes if full else _no_attributes)


def _any_value(value, depth: int) -> Any:
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
        return [_any_value(v, depth + 1) for v in value.array_value.values]
    return {kv.key: _any_value(kv.value, depth + 1) for kv in value.kvlist_value.values}


def _attributes(kvs) -> dict:
    return {kv.key: _any_value(kv.value, 0) for kv in kvs}


def _no_attributes(kvs) -> dict:
    return {}


def _scopes(resource_items, items_field: str, scope_field: str, attrs=_attributes):
    """(Scope, items) per scope of every resource of a request."""
    for rg in resource_items:
        resource = attrs(rg.resource.attributes)
        for sg in getattr(rg, scope_field):
            sc = sg.scope
            scope = Scope(resource, sc.name, sc.version, attrs(sc.attributes))
            yield scope, getattr(sg, items_field)


def _logs(request, attrs=_attributes) -> Decoded:
    out = Decoded(LOGS, [])
    append = out.items.append
    full = attrs is _attributes
    for scope, records in _scopes(request.resource_logs, "log_records", "scope_logs", attrs):
        for lr in records:
            try:
                item = LogIn(
                    scope,
                    lr.time_unix_nano,
                    lr.observed_time_unix_nano,
                    lr.severity_number,
                    lr.severity_text,
                    _any_value(lr.body, 0) if full and lr.HasField("body") else None,
                    attrs(lr.attributes),
                    lr.dropped_attributes_count,
                    lr.trace_id.hex(),
                    lr.span_id.hex(),
                    lr.event_name,
                )
                append(judge_log(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _spans(request, attrs=_attributes) -> Decoded:
    out = Decoded(TRACES, [])
    append = out.items.append
    for scope, spans in _scopes(request.resource_spans, "spans", "scope_spans", attrs):
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
                append(judge_span(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _metrics(request, attrs=_attributes) -> Decoded:
    out = Decoded(METRICS, [])
    append = out.items.append
    for scope, metrics in _scopes(request.resource_metrics, "metrics", "scope_metrics", attrs):
        for metric in metrics:
            kind = metric.WhichOneof("data")
            if kind is None:
                continue
            data = getattr(metric, kind)
            if kind in ("exponential_histogram", "summary"):
                for _ in data.data_points:
                    out.reject(unsupported_reason(kind))
                continue
            temporality = getattr(data, "aggregation_temporality", 0)
            monotonic = kind == "sum" and data.is_monotonic
            for dp in data.data_points:
                if dp.flags & NO_RECORDED_VALUE:
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
                    append(judge_point(item))
                except ItemError as exc:
                    out.reject(str(exc))
    return out


_DECODERS = {LOGS: _logs, METRICS: _metrics, TRACES: _spans}
