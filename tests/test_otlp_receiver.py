"""The OTLP/HTTP endpoints: encodings, answers, partial success and every error status."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib

import brotli
import orjson
import pytest
import zstandard
from django.db import connection
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from runs.models import Event, RunMetric
from telemetry.models import IngestBatch, ProjectLimits, Span
from tests.fixtures.otlp.payloads import (
    CHILD,
    ROOT,
    gauge_metric,
    histogram_metric,
    log,
    logs_request,
    metrics_request,
    span,
    to_json,
    traces_request,
)

PROTOBUF, JSON = "application/x-protobuf", "application/json"

# Shaped like the examples of the OTLP specification (opentelemetry-proto/examples):
# hex ids in upper case, 64-bit integers as numbers and as strings, enums as
# integers, and a field this receiver does not know.
SPEC_TRACE = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
            },
            "scopeSpans": [
                {
                    "scope": {
                        "name": "my.library",
                        "version": "1.0.0",
                        "attributes": [
                            {"key": "my.scope.attribute", "value": {"stringValue": "scope"}}
                        ],
                    },
                    "spans": [
                        {
                            "traceId": "5B8EFFF798038103D269B633813FC60C",
                            "spanId": "EEE19B7EC3C1B174",
                            "parentSpanId": "EEE19B7EC3C1B173",
                            "name": "I'm a server span",
                            "startTimeUnixNano": 1544712660000000000,
                            "endTimeUnixNano": "1544712661000000000",
                            "kind": 2,
                            "flags": 257,
                            "futureField": {"ignored": True},
                            "attributes": [
                                {"key": "my.span.attr", "value": {"stringValue": "some value"}}
                            ],
                        }
                    ],
                }
            ],
        }
    ]
}
SPEC_LOGS = {
    "resourceLogs": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
            },
            "scopeLogs": [
                {
                    "scope": {"name": "my.library", "version": "1.0.0"},
                    "logRecords": [
                        {
                            "timeUnixNano": "1544712660300000000",
                            "observedTimeUnixNano": 1544712660300000000,
                            "severityNumber": 10,
                            "severityText": "Information",
                            "traceId": "5B8EFFF798038103D269B633813FC60C",
                            "spanId": "EEE19B7EC3C1B174",
                            "body": {"stringValue": "Example log record"},
                            "attributes": [
                                {"key": "string.attribute", "value": {"stringValue": "some"}},
                                {"key": "boolean.attribute", "value": {"boolValue": True}},
                                {"key": "int.attribute", "value": {"intValue": "10"}},
                                {"key": "double.attribute", "value": {"doubleValue": 637.704}},
                                {
                                    "key": "array.attribute",
                                    "value": {
                                        "arrayValue": {
                                            "values": [
                                                {"stringValue": "many"},
                                                {"stringValue": "values"},
                                            ]
                                        }
                                    },
                                },
                                {
                                    "key": "map.attribute",
                                    "value": {
                                        "kvlistValue": {
                                            "values": [
                                                {
                                                    "key": "some.map.key",
                                                    "value": {"stringValue": "some value"},
                                                }
                                            ]
                                        }
                                    },
                                },
                            ],
                        }
                    ],
                }
            ],
        }
    ]
}
SPEC_METRICS = {
    "resourceMetrics": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]
            },
            "scopeMetrics": [
                {
                    "scope": {"name": "my.library", "version": "1.0.0"},
                    "metrics": [
                        {
                            "name": "my.counter",
                            "unit": "1",
                            "description": "I am a Counter",
                            "sum": {
                                "aggregationTemporality": 1,
                                "isMonotonic": True,
                                "dataPoints": [
                                    {
                                        "asDouble": 5,
                                        "startTimeUnixNano": 1544712660300000000,
                                        "timeUnixNano": 1544712660300000000,
                                        "attributes": [
                                            {"key": "my.attr", "value": {"stringValue": "v"}}
                                        ],
                                    }
                                ],
                            },
                        },
                        {
                            "name": "my.gauge",
                            "unit": "1",
                            "gauge": {
                                "dataPoints": [
                                    {"asInt": "10", "timeUnixNano": "1544712660300000000"}
                                ]
                            },
                        },
                        {
                            "name": "my.histogram",
                            "unit": "ms",
                            "histogram": {
                                "aggregationTemporality": 1,
                                "dataPoints": [
                                    {
                                        "startTimeUnixNano": 1544712660300000000,
                                        "timeUnixNano": 1544712660300000000,
                                        "count": "3",
                                        "sum": 3,
                                        "bucketCounts": ["1", 1, 1],
                                        "explicitBounds": [1, 2],
                                        "min": 0.5,
                                        "max": 1.5,
                                    }
                                ],
                            },
                        },
                    ],
                }
            ],
        }
    ]
}


@pytest.fixture
def send(client, token, django_capture_on_commit_callbacks):
    """POST raw bytes to an OTLP endpoint; the (eager) worker stores what was spooled."""

    def post(path: str, body: bytes, content_type: str = PROTOBUF, auth=None, **headers):
        extra = {}
        if auth is not False:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {token}" if auth is None else auth
        for name, value in headers.items():
            extra["HTTP_" + name.upper()] = value
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(path, body, content_type=content_type, **extra)

    return post


def _status(response) -> tuple[int, str]:
    if response["Content-Type"] == JSON:
        body = response.json()
        return body["code"], body["message"]
    status = Status.FromString(response.content)
    return status.code, status.message


# --- Encodings and answers ---------------------------------------------------------------


def test_it_answers_an_empty_protobuf_response_to_a_protobuf_request(send):
    response = send("/v1/traces", traces_request(span("a", ROOT)).SerializeToString())
    assert response.status_code == 200
    assert response["Content-Type"] == PROTOBUF
    assert response.content == b""
    assert Span.objects.count() == 1


def test_it_answers_an_empty_json_object_to_a_json_request(send):
    response = send("/v1/logs", orjson.dumps(SPEC_LOGS), JSON)
    assert response.status_code == 200
    assert response["Content-Type"] == JSON
    assert response.content == b"{}"


def test_it_reads_the_specification_trace_example(send, project):
    assert send("/v1/traces", orjson.dumps(SPEC_TRACE), JSON).content == b"{}"
    stored = Span.objects.get()
    assert (stored.trace_id, stored.span_id, stored.parent_span_id) == (
        "5b8efff798038103d269b633813fc60c",
        "eee19b7ec3c1b174",
        "eee19b7ec3c1b173",
    )
    assert (stored.kind, stored.duration_ms, stored.service) == (2, 1000.0, "my.service")
    assert stored.start_time.isoformat() == "2018-12-13T14:51:00+00:00"
    assert stored.attributes == {"my.span.attr": "some value"}
    assert stored.run.run_id == "trace-5b8efff798038103d269b633813fc60c"


def test_it_reads_the_specification_logs_example(send):
    send("/v1/logs", orjson.dumps(SPEC_LOGS), JSON)
    event = Event.objects.get()
    assert (event.event, event.level, event.message) == ("otel.log", "info", "Example log record")
    assert event.ts.isoformat() == "2018-12-13T14:51:00.300000+00:00"
    assert event.trace_id == "5b8efff798038103d269b633813fc60c"
    assert event.span_id == "eee19b7ec3c1b174"
    assert event.data["int.attribute"] == 10
    assert event.data["array.attribute"] == ["many", "values"]
    assert event.data["map.attribute"] == {"some.map.key": "some value"}
    assert event.data["otel.scope.name"] == "my.library"


def test_it_reads_the_specification_metrics_example(send):
    send("/v1/metrics", orjson.dumps(SPEC_METRICS), JSON)
    values = dict(RunMetric.objects.values_list("name", "value"))
    assert values == {"my.counter": 5.0, "my.gauge": 10.0, "my.histogram": 3.0}
    histogram = RunMetric.objects.get(name="my.histogram").histogram
    assert histogram == {
        "bounds": [1.0, 2.0],
        "counts": [1, 1, 1],
        "sum": 3.0,
        "count": 3,
        "min": 0.5,
        "max": 1.5,
    }


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "br", "zstd"])
def test_it_accepts_compressed_bodies(send, encoding):
    body = logs_request(log("bd.call")).SerializeToString()
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    elif encoding == "br":
        body = brotli.compress(body)
    elif encoding == "zstd":
        body = zstandard.ZstdCompressor().compress(body)  # what the Collector may send
    else:
        body = zlib.compress(body)[2:-4]  # deflate without the zlib header
    response = send("/v1/logs", body, content_encoding=encoding.removeprefix("raw-"))
    assert response.status_code == 200
    assert Event.objects.get().event == "bd.call"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_body_cut_short_is_a_400_even_when_nothing_came_out(send, encoding):
    whole = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[encoding](logs_request(log("bd.call")).SerializeToString())
    for cut in (4, len(whole) // 2):
        response = send("/v1/logs", whole[:cut], content_encoding=encoding)
        assert response.status_code == 400, (encoding, cut)
        assert "truncated" in _status(response)[1]
    assert not Event.objects.exists()


def test_it_refuses_an_encoding_it_does_not_know(send):
    response = send("/v1/logs", b"\x00", content_encoding="compress")
    assert response.status_code == 415
    assert "gzip, deflate, br or zstd" in _status(response)[1]


def test_it_is_durable_before_it_answers(client, token):
    # No on_commit callbacks run here: the worker never sees the batch.
    body = metrics_request(gauge_metric("g", 1.0)).SerializeToString()
    response = client.post(
        "/v1/metrics", body, content_type=PROTOBUF, HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert response.status_code == 200
    batch = IngestBatch.objects.get()
    assert (batch.kind, batch.state, batch.params) == (
        "otlp_metrics",
        "pending",
        {"encoding": "protobuf"},
    )
    assert batch.summary == {"accepted": 1, "rejected": 0, "error": ""}
    assert RunMetric.objects.count() == 0


def test_it_takes_bodies_larger_than_djangos_upload_limit(send):
    records = [log("pane.output", attributes={"out": "z" * 3000, "i": i}) for i in range(1000)]
    body = logs_request(*records).SerializeToString()
    assert len(body) > 2_621_440  # DATA_UPLOAD_MAX_MEMORY_SIZE
    assert send("/v1/logs", body).status_code == 200
    assert Event.objects.count() == 1000


# --- Partial success ----------------------------------------------------------------------


def test_it_counts_rejected_spans_and_keeps_the_rest(send):
    request = traces_request(span("good", ROOT), span("also good", CHILD, ROOT))
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.name = "no ids"
    bad.start_time_unix_nano = 1
    response = send("/v1/traces", request.SerializeToString())
    assert response.status_code == 200
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert answer.partial_success.rejected_spans == 1
    assert "span without a valid trace_id" in answer.partial_success.error_message
    assert Span.objects.count() == 2
    assert IngestBatch.objects.get().summary["rejected"] == 1


def test_it_counts_log_records_with_bad_ids_in_json(send):
    payload = to_json(logs_request(log("ok"), log("short id"), log("not hex")))
    records = payload["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
    records[1]["traceId"] = "abcd"
    records[2]["spanId"] = "zzzzzzzzzzzzzzzz"
    response = send("/v1/logs", orjson.dumps(payload), JSON)
    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert partial["rejectedLogRecords"] == "2"
    assert "trace_id must be 16 bytes (32 hex digits), got 4" in partial["errorMessage"]
    assert "spanId: must be a hex string" in partial["errorMessage"]
    assert list(Event.objects.values_list("event", flat=True)) == ["ok"]


def test_it_rejects_exponential_histograms_nan_points_and_bad_buckets(send):
    exponential = Metric(name="latency.exp")
    for _ in range(2):
        exponential.exponential_histogram.data_points.add(time_unix_nano=1, count=1)
    nan = gauge_metric("queue.depth", float("nan"))
    buckets = histogram_metric("bd.duration_ms", [10.0, 100.0], [1, 1], 5.0)
    good = gauge_metric("cost", 0.5)
    request = metrics_request(exponential, nan, buckets, good)
    response = send("/v1/metrics", request.SerializeToString())
    partial = ExportMetricsServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_data_points == 4
    message = partial.error_message
    assert message.startswith("rejected 4 of 5 data points: exponential histograms are not")
    assert "(2x)" in message and "value is NaN or infinite" in message
    assert "one more entry than explicit_bounds" in message
    assert list(RunMetric.objects.values_list("name", flat=True)) == ["cost"]


def test_it_answers_partial_success_without_spooling_when_nothing_is_left(send):
    request = logs_request(log("x", trace_id="ab" * 5))
    response = send("/v1/logs", request.SerializeToString())
    assert response.status_code == 200
    partial = ExportLogsServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_log_records == 1
    assert IngestBatch.objects.count() == 0


def test_it_accepts_a_request_with_nothing_in_it(send):
    empty = traces_request()
    assert send("/v1/traces", empty.SerializeToString()).content == b""
    assert send("/v1/traces", b"{}", JSON).content == b"{}"
    assert IngestBatch.objects.count() == 0


# --- Errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/logs", "/v1/metrics", "/v1/traces"])
def test_it_allows_only_post(client, path):
    for method in (client.get, client.put, client.delete):
        response = method(path)
        assert response.status_code == 405
        assert response["Allow"] == "POST"


def test_it_refuses_unknown_content_types_with_415(send):
    response = send("/v1/logs", b"hello", "text/plain")
    assert response.status_code == 415
    code, message = _status(response)
    assert code == 3 and "application/x-protobuf" in message


@pytest.mark.parametrize(
    "auth", [False, "Bearer rl_wrong", "Basic dXNlcjpwdw==", "Bearer ", "rl_token"]
)
def test_it_refuses_requests_without_a_valid_token(send, auth):
    response = send("/v1/traces", traces_request(span("a", ROOT)).SerializeToString(), auth=auth)
    assert response.status_code == 401
    assert response["Content-Type"] == PROTOBUF
    assert _status(response)[0] == 16
    assert response["WWW-Authenticate"] == "Bearer"


def test_it_answers_401_in_json_to_a_json_request(send):
    response = send("/v1/logs", b"{}", JSON, auth="Bearer nope")
    assert response.status_code == 401
    assert response.json()["code"] == 16 and "token" in response.json()["message"]


def test_it_does_not_take_a_token_of_another_project(send, stranger, project):
    stranger[0].delete()
    response = send("/v1/logs", b"{}", JSON, auth=f"Bearer {stranger[1]}")
    assert response.status_code == 401


def test_it_rate_limits_per_project_with_retry_after(send, project):
    ProjectLimits.objects.create(project=project, ingest_per_minute=2)
    body = logs_request(log("x")).SerializeToString()
    assert [send("/v1/logs", body).status_code for _ in range(2)] == [200, 200]
    response = send("/v1/logs", body)
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 65  # the sliding minute, counted in 5-second slots
    assert _status(response)[0] == 8
    assert Event.objects.count() == 2


def test_it_answers_400_with_a_protobuf_status_to_undecodable_protobuf(send):
    response = send("/v1/traces", b"\xff\xff\xff garbage")
    assert response.status_code == 400
    assert response["Content-Type"] == PROTOBUF
    code, message = _status(response)
    assert code == 3 and "ExportTraceServiceRequest" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"resourceSpans": {"a": 1}}', "resourceSpans: must be an array"),
        (b'{"resourceSpans": [{"scopeSpans": [7]}]}', "scopeSpans: items must be objects"),
    ],
)
def test_it_answers_400_with_a_json_status_to_bad_json(send, body, expected):
    response = send("/v1/traces", body, JSON)
    assert response.status_code == 400
    assert response["Content-Type"] == JSON
    answer = response.json()
    assert answer["code"] == 3 and expected in answer["message"]


def test_it_answers_400_to_truncated_gzip(send):
    body = gzip.compress(logs_request(log("x")).SerializeToString())[:-12]
    response = send("/v1/logs", body, content_encoding="gzip")
    assert response.status_code == 400
    assert "gzip" in _status(response)[1]


def test_it_refuses_bodies_over_the_limit_with_413(send, settings):
    settings.OTLP_MAX_BYTES = 10_000
    body = logs_request(log("x", attributes={"big": "b" * 20_000})).SerializeToString()
    response = send("/v1/logs", body)
    assert response.status_code == 413
    assert "10000 bytes" in _status(response)[1]


def test_it_cuts_off_a_decompression_bomb_quickly_with_bounded_memory(send, settings):
    settings.OTLP_MAX_BYTES = 1024 * 1024
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    chunk = b"\0" * (1024 * 1024)
    body = b"".join(bomb.compress(chunk) for _ in range(512)) + bomb.flush()  # 512 MB inflated
    assert len(body) < 600_000
    tracemalloc.start()
    started = time.perf_counter()
    response = send("/v1/logs", body, content_encoding="gzip")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert response.status_code == 413
    assert elapsed < 2.0
    assert peak < 16 * 1024 * 1024  # a few copies of the limit, never the 512 MB
    assert IngestBatch.objects.count() == 0


def test_it_answers_503_with_retry_after_when_the_spool_cannot_be_written(send):
    # A real failure of the INSERT, raised by PostgreSQL itself.
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION refuse_batch() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
        )
        cursor.execute(
            "CREATE TRIGGER refuse_batch BEFORE INSERT ON telemetry_ingestbatch"
            " FOR EACH ROW EXECUTE FUNCTION refuse_batch()"
        )
    response = send("/v1/traces", orjson.dumps(to_json(traces_request(span("a", ROOT)))), JSON)
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json()["code"] == 14
    assert Span.objects.count() == 0


def test_it_never_answers_500_to_odd_json(send):
    odd = [
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [None, 1, "x", []]}]}]},
        {
            "resourceLogs": [
                {"resource": {"attributes": "nope"}, "scopeLogs": [{"logRecords": [{}]}]}
            ]
        },
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"}]}]}]},
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": 2**70}]}]}]},
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"attributes": [{"key": 1}]}]}]}]},
        {
            "resourceLogs": [
                {"scopeLogs": [{"logRecords": [{"body": {"intValue": "99999999999999999999"}}]}]}
            ]
        },
    ]
    for payload in odd:
        response = send("/v1/logs", json.dumps(payload).encode(), JSON)
        assert response.status_code == 200, (payload, response.content)
        assert int(response.json()["partialSuccess"]["rejectedLogRecords"]) >= 1
    assert Event.objects.count() == 0
    # An empty record is a valid one: no time (the time it arrived), no body, no service.
    send("/v1/logs", b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{}]}]}]}', JSON)
    event = Event.objects.get()
    assert (event.event, event.run.run_id[:5]) == ("otel.log", "otel@")
