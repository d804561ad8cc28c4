"""A request body in, its answer out: `decode` picks the decoder, `response_body`
writes the Export*ServiceResponse.

The request decodes and judges every item (to answer `partial_success` with what
was refused) and spools the raw body; the worker decodes it again with the same
code (store.py) and stores what was accepted.
"""

from __future__ import annotations

import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from telemetry.otlp import otlp_json, protobuf
from telemetry.otlp.items import LOGS, METRICS, TRACES, Decoded

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


def decode(signal: str, body: bytes, json: bool, full: bool = True) -> Decoded:
    """Decode and judge one request body. Raises OtlpError when it is unreadable.

    `full=False` (the request, which only counts) skips converting protobuf attribute
    values: any protobuf AnyValue converts, so the verdicts are the same. JSON is
    always walked in full, as a malformed attribute refuses its item.
    """
    if json:
        return otlp_json.decode(signal, body)
    return protobuf.decode(signal, body, full)


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
