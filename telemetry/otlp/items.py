"""What a request becomes: the decoded items, their limits, and the judging of each.

Both decoders (protobuf.py, otlp_json.py) turn a request into `Decoded`: the
accepted items (`LogIn`, `SpanIn`, `PointIn`, each pointing at its `Scope`) and
the reasons the others were refused. An item is judged by the same function
whichever encoding it came in, so a protobuf body and its OTLP/JSON twin give the
same verdicts and store identical rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LOGS, METRICS, TRACES = "logs", "metrics", "traces"
# The IngestBatch kind a request of each signal is spooled as (telemetry/receivers/otlp.py).
BATCH_KIND = {LOGS: "otlp_logs", METRICS: "otlp_metrics", TRACES: "otlp_traces"}

MAX_DEPTH = 32  # nesting of array/kvlist attribute values
MAX_ATTRIBUTES = 128  # per attribute map (record, scope, resource): OTel's default limit
MAX_LIST = 128  # items of an array value, events of a span
MAX_LABEL = 200  # a metric label value
MAX_ERRORS = 5  # distinct reasons named in partial_success.error_message
ELLIPSIS = "…"
TOO_DEEP = "[too deep]"
_MAX_NS = 253_402_300_799 * 10**9  # 9999-12-31T23:59:59Z
NO_RECORDED_VALUE = 1  # DataPointFlags: a staleness marker, not a measurement
_NOUN = {LOGS: "log records", METRICS: "data points", TRACES: "spans"}


class OtlpError(Exception):
    """The whole request is unreadable (400): not protobuf or not OTLP JSON."""


class ItemError(ValueError):
    """One log record, span or data point is refused; the others are kept."""


# --- The internal shape -------------------------------------------------------


class Scope:
    """A resource and an instrumentation scope: shared by every item under them."""

    __slots__ = ("resource", "name", "version", "attrs", "derived")

    def __init__(self, resource: dict, name: str, version: str, attrs: dict):
        self.resource = resource
        self.name = name
        self.version = version
        self.attrs = attrs
        # What every item of the scope shares: mapping.scope_derived fills it once.
        self.derived: dict | None = None


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


def judge_log(item: LogIn) -> LogIn:
    item.trace_id = _check_id(item.trace_id, 16, "trace_id")
    item.span_id = _check_id(item.span_id, 8, "span_id")
    _check_time(item.time_ns, "time_unix_nano")
    _check_time(item.observed_ns, "observed_time_unix_nano")
    return item


def judge_span(item: SpanIn) -> SpanIn:
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


def judge_point(item: PointIn) -> PointIn:
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


def unsupported_reason(kind: str) -> str:
    if kind == "exponential_histogram":
        return (
            "exponential histograms are not supported: configure explicit bucket "
            "histograms (the SDK default)"
        )
    return "summary data points are not supported: send histograms"
