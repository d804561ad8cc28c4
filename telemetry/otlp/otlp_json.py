"""The OTLP/JSON decoder: an Export*ServiceRequest in its JSON form into judged items.

Walked by hand: json_format.Parse reads hex ids as base64 and is slow. Keys are
lowerCamelCase, enums integers (or their names), 64-bit integers strings or
numbers, unknown fields ignored. Problems inside an item refuse the item; problems
in the envelope around items refuse the request. Attribute values are always
converted in full, as a malformed one refuses its item.
"""

from __future__ import annotations

import json as stdlib_json
from itertools import islice
from typing import Any

import orjson
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

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

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Enum values by name: proto3 JSON allows both the number and the name.
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


def decode(signal: str, body: bytes) -> Decoded:
    """Decode and judge one OTLP/JSON body. Raises OtlpError when it is unreadable."""
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
    return _DECODERS[signal](data)


def _array(obj: dict, key: str, error: type[Exception] = OtlpError) -> list:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise error(f"{key}: must be an array")
    return value


def _object(obj: dict, key: str, error: type[Exception] = OtlpError) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"{key}: must be an object")
    return value


def _string(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ItemError(f"{key}: must be a string")
    return value


def _integer(value: Any, what: str, signed: bool = False) -> int:
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


def _number(value: Any, what: str) -> float:
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:  # "NaN", "Infinity", "-Infinity" or a number as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ItemError(f"{what}: not a number")


def _enum(value: Any, names: dict[str, int], what: str) -> int:
    if type(value) is int:
        return value
    if value is None:
        return 0
    if isinstance(value, str) and value in names:
        return names[value]
    raise ItemError(f"{what}: not an enum value")


def _hex_id(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not value:
        return ""
    if not isinstance(value, str) or not _HEX_DIGITS.issuperset(value):
        raise ItemError(f"{key}: must be a hex string")
    return value.lower()


def _any_value(value: Any, depth: int) -> Any:
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
        return _integer(value["intValue"], "intValue", signed=True)
    if "boolValue" in value:
        flag = value["boolValue"]
        if not isinstance(flag, bool):
            raise ItemError("boolValue: must be true or false")
        return flag
    if "doubleValue" in value:
        return _number(value["doubleValue"], "doubleValue")
    if "bytesValue" in value:
        raw = value["bytesValue"]
        if not isinstance(raw, str):
            raise ItemError("bytesValue: must be a base64 string")
        return raw
    if "arrayValue" in value:
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        items = _array(_object(value, "arrayValue", ItemError), "values", ItemError)
        return [_any_value(v, depth + 1) for v in items]
    if "kvlistValue" in value:
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        items = _array(_object(value, "kvlistValue", ItemError), "values", ItemError)
        return _attributes(items, depth + 1)
    return None


def _attributes(kvs: list, depth: int = 0) -> dict:
    out = {}
    for kv in kvs:
        if not isinstance(kv, dict):
            raise ItemError("attribute: must be a {key, value} object")
        key = kv.get("key") or ""
        if not isinstance(key, str):
            raise ItemError("attribute key: must be a string")
        out[key] = _any_value(kv.get("value"), depth)
    return out


def _scopes(data: dict, resource_key: str, scope_key: str, items_key: str):
    """(Scope or ItemError, items) per scope of every resource of a request."""
    for rg in _array(data, resource_key):
        if not isinstance(rg, dict):
            raise OtlpError(f"{resource_key}: items must be objects")
        resource_obj = _object(rg, "resource")
        for sg in _array(rg, scope_key):
            if not isinstance(sg, dict):
                raise OtlpError(f"{scope_key}: items must be objects")
            items = _array(sg, items_key)
            try:
                # Bad attributes of a resource or scope refuse the items under it.
                sc = _object(sg, "scope", ItemError)
                scope: Scope | ItemError = Scope(
                    _attributes(_array(resource_obj, "attributes", ItemError)),
                    _string(sc, "name"),
                    _string(sc, "version"),
                    _attributes(_array(sc, "attributes", ItemError)),
                )
            except ItemError as exc:
                scope = exc
            yield scope, items


def _logs(data: dict) -> Decoded:
    out = Decoded(LOGS, [])
    append = out.items.append
    for scope, records in _scopes(data, "resourceLogs", "scopeLogs", "logRecords"):
        for lr in records:
            try:
                if isinstance(scope, ItemError):
                    raise scope
                if not isinstance(lr, dict):
                    raise ItemError("log record: must be an object")
                item = LogIn(
                    scope,
                    _integer(lr.get("timeUnixNano"), "timeUnixNano"),
                    _integer(lr.get("observedTimeUnixNano"), "observedTimeUnixNano"),
                    _enum(lr.get("severityNumber"), _SEVERITIES, "severityNumber"),
                    _string(lr, "severityText"),
                    _any_value(lr.get("body"), 0),
                    _attributes(_array(lr, "attributes", ItemError)),
                    _integer(lr.get("droppedAttributesCount"), "droppedAttributesCount"),
                    _hex_id(lr, "traceId"),
                    _hex_id(lr, "spanId"),
                    _string(lr, "eventName"),
                )
                append(judge_log(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


def _spans(data: dict) -> Decoded:
    out = Decoded(TRACES, [])
    append = out.items.append
    for scope, spans in _scopes(data, "resourceSpans", "scopeSpans", "spans"):
        for sp in spans:
            try:
                if isinstance(scope, ItemError):
                    raise scope
                if not isinstance(sp, dict):
                    raise ItemError("span: must be an object")
                events = []
                for ev in islice(_array(sp, "events", ItemError), MAX_LIST):
                    if not isinstance(ev, dict):
                        raise ItemError("span event: must be an object")
                    events.append(
                        (
                            _integer(ev.get("timeUnixNano"), "event timeUnixNano"),
                            _string(ev, "name"),
                            _attributes(_array(ev, "attributes", ItemError)),
                        )
                    )
                status = _object(sp, "status", ItemError)
                item = SpanIn(
                    scope,
                    _hex_id(sp, "traceId"),
                    _hex_id(sp, "spanId"),
                    _hex_id(sp, "parentSpanId"),
                    _string(sp, "name"),
                    _enum(sp.get("kind"), _SPAN_KINDS, "kind"),
                    _integer(sp.get("startTimeUnixNano"), "startTimeUnixNano"),
                    _integer(sp.get("endTimeUnixNano"), "endTimeUnixNano"),
                    _attributes(_array(sp, "attributes", ItemError)),
                    _integer(sp.get("droppedAttributesCount"), "droppedAttributesCount"),
                    events,
                    _enum(status.get("code"), _STATUS_CODES, "status.code"),
                    _string(status, "message"),
                )
                append(judge_span(item))
            except ItemError as exc:
                out.reject(str(exc))
    return out


_KINDS = (
    ("sum", "sum"),
    ("gauge", "gauge"),
    ("histogram", "histogram"),
    ("exponentialHistogram", "exponential_histogram"),
    ("summary", "summary"),
)


def _point(scope: Scope, metric: dict, kind: str, data: dict, dp: Any) -> PointIn | None:
    if not isinstance(dp, dict):
        raise ItemError("data point: must be an object")
    if _integer(dp.get("flags"), "flags") & NO_RECORDED_VALUE:
        return None
    if kind == "histogram":
        raw_sum, raw_min, raw_max = dp.get("sum"), dp.get("min"), dp.get("max")
        hist = {
            "bounds": [
                _number(b, "explicitBounds") for b in _array(dp, "explicitBounds", ItemError)
            ],
            "counts": [_integer(c, "bucketCounts") for c in _array(dp, "bucketCounts", ItemError)],
            "sum": None if raw_sum is None else _number(raw_sum, "sum"),
            "count": _integer(dp.get("count"), "count"),
            "min": None if raw_min is None else _number(raw_min, "min"),
            "max": None if raw_max is None else _number(raw_max, "max"),
        }
        value = hist["sum"] or 0.0
    else:
        hist = None
        if "asDouble" in dp:
            value = _number(dp["asDouble"], "asDouble")
        elif "asInt" in dp:
            value = float(_integer(dp["asInt"], "asInt", signed=True))
        else:
            raise ItemError("data point without a value")
    name = metric.get("name")
    unit = metric.get("unit")
    return PointIn(
        scope,
        name if isinstance(name, str) else "",
        unit if isinstance(unit, str) else "",
        kind,
        _enum(data.get("aggregationTemporality"), _TEMPORALITIES, "aggregationTemporality"),
        kind == "sum" and data.get("isMonotonic") is True,
        _attributes(_array(dp, "attributes", ItemError)),
        _integer(dp.get("timeUnixNano"), "timeUnixNano"),
        value,
        hist,
        _integer(dp.get("startTimeUnixNano"), "startTimeUnixNano"),
    )


def _metrics(data: dict) -> Decoded:
    out = Decoded(METRICS, [])
    append = out.items.append
    for scope, metrics in _scopes(data, "resourceMetrics", "scopeMetrics", "metrics"):
        for metric in metrics:
            if not isinstance(metric, dict):
                out.reject("metric: must be an object")
                continue
            found = next(((k, t) for k, t in _KINDS if metric.get(k) is not None), None)
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
                    out.reject(unsupported_reason(kind))
                continue
            for dp in points:
                try:
                    if isinstance(scope, ItemError):
                        raise scope
                    item = _point(scope, metric, kind, body, dp)
                    if item is not None:
                        append(judge_point(item))
                except ItemError as exc:
                    out.reject(str(exc))
    return out


_DECODERS = {LOGS: _logs, METRICS: _metrics, TRACES: _spans}
