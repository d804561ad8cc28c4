"""The real OpenTelemetry Python SDK and its OTLP/HTTP exporters against a live portal.

What an agent instrumented with `opentelemetry-sdk` sends (protobuf, gzip or not,
`Authorization` from the exporter's headers) must arrive, be tied to the right
run, and keep its values: nested spans' parents, log attributes, counter sums
and histogram buckets.
"""

from __future__ import annotations

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import StatusCode

from runs.models import Run, RunMetric
from telemetry.models import IngestBatch, Span

pytestmark = pytest.mark.django_db(transaction=True)

RUN_ID = "0f6c1c8e-6b0e-4b7a-9a8e-3c2d1b0a9f87"
GASTOWN = {
    "service.name": "gastown",
    "service.version": "0.9.1",
    "gt.rig": "gastown",
    "gt.role": "gastown/polecats/Toast",
    "gt.agent": "Toast",
    "gt.run_id": RUN_ID,
}


@pytest.fixture
def endpoint(live_server, token):
    def make(signal: str) -> dict:
        return {
            "endpoint": f"{live_server.url}/v1/{signal}",
            "headers": {"Authorization": f"Bearer {token}"},
            "timeout": 10,
        }

    return make


def test_it_stores_nested_spans_from_the_sdk_exporter(endpoint):
    provider = TracerProvider(resource=Resource.create({"service.name": "codebuddy"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(**endpoint("traces"), compression=Compression.Gzip))
    )
    tracer = provider.get_tracer("codebuddy.agent", "1.2.0")
    with tracer.start_as_current_span("agent.run") as root:
        with tracer.start_as_current_span("llm.call", attributes={"model": "gpt-4o"}) as llm:
            llm.add_event("retry", {"attempt": 2})
            with tracer.start_as_current_span("http.request") as http:
                http.set_attribute("http.status_code", 429)
        with tracer.start_as_current_span("tool.bash") as tool:
            tool.set_status(StatusCode.ERROR, "exit 1")
    provider.shutdown()

    trace_id = format(root.get_span_context().trace_id, "032x")
    spans = {s.name: s for s in Span.objects.filter(trace_id=trace_id)}
    assert set(spans) == {"agent.run", "llm.call", "http.request", "tool.bash"}
    ids = {
        name: format(s.get_span_context().span_id, "016x")
        for name, s in (
            ("agent.run", root),
            ("llm.call", llm),
            ("http.request", http),
            ("tool.bash", tool),
        )
    }
    assert {name: s.span_id for name, s in spans.items()} == ids
    assert spans["agent.run"].parent_span_id == ""
    assert spans["llm.call"].parent_span_id == ids["agent.run"]
    assert spans["http.request"].parent_span_id == ids["llm.call"]
    assert spans["tool.bash"].parent_span_id == ids["agent.run"]
    assert spans["llm.call"].attributes == {"model": "gpt-4o"}
    assert spans["llm.call"].events[0]["name"] == "retry"
    assert spans["http.request"].attributes == {"http.status_code": 429}
    assert (spans["tool.bash"].status_code, spans["tool.bash"].status_message) == (2, "exit 1")
    assert spans["agent.run"].service == "codebuddy"
    assert spans["agent.run"].duration_ms >= spans["llm.call"].duration_ms > 0

    # The trace is a run of its own, finished when its root span arrived (last).
    run = Run.objects.get()
    assert (run.run_id, run.slug, run.status) == (f"trace-{trace_id}", "codebuddy", "succeeded")
    assert all(s.run_id == run.pk for s in spans.values())
    assert IngestBatch.objects.filter(state="done", kind="otlp_traces").count() == 4


def test_it_stores_logs_from_the_sdk_exporter_on_the_run_they_name(endpoint):
    # As Gas Town's recorder emits them: the body is the event name, details are attributes.
    provider = LoggerProvider(resource=Resource.create(GASTOWN))
    provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(**endpoint("logs"))))
    logger = provider.get_logger("gastown.telemetry")
    tracer = TracerProvider().get_tracer("gt")
    info, warn, error = SeverityNumber.INFO, SeverityNumber.WARN, SeverityNumber.ERROR
    logger.emit(body="session.start", severity_number=info, attributes={"session": "gt-Toast"})
    with tracer.start_as_current_span("gt.prime") as prime_span:
        work = {"work_rig": "gastown", "work_bead": "sg-05iq", "work_mol": "mol-polecat-work"}
        logger.emit(body="prime", severity_number=info, attributes={**work, "formula": "p"})
    logger.emit(
        body="bd.call",
        severity_number=warn,
        attributes={"subcommand": "show", "duration_ms": 12.5, "args": ["show", "sg-05iq"]},
    )
    logger.emit(body="bd exited with status 1: issue not found", severity_number=error)
    provider.shutdown()

    run = Run.objects.get()
    assert (run.run_id, run.slug) == (RUN_ID, "gastown")
    events = list(run.events.order_by("seq"))
    assert [(e.event, e.level) for e in events] == [
        ("session.start", "info"),
        ("prime", "info"),
        ("bd.call", "warn"),
        ("otel.log", "error"),
    ]
    start, prime, bd_call, failure = events
    assert start.data["session"] == "gt-Toast"
    assert start.data["gt.agent"] == "Toast" and start.data["service.name"] == "gastown"
    assert prime.data["work_bead"] == "sg-05iq"
    assert prime.trace_id == format(prime_span.get_span_context().trace_id, "032x")
    assert prime.span_id == format(prime_span.get_span_context().span_id, "016x")
    assert bd_call.data["duration_ms"] == 12.5
    assert bd_call.data["args"] == ["show", "sg-05iq"]
    assert failure.message == "bd exited with status 1: issue not found"
    assert (run.events_count, run.warnings_count, run.errors_count) == (4, 1, 1)
    assert run.attributes["work_rig"] == "gastown"
    assert run.attributes["work_mol"] == "mol-polecat-work"
    assert run.attributes["gt.role"] == "gastown/polecats/Toast"


def test_it_stores_a_counter_and_a_histogram_from_the_sdk_exporter(endpoint):
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(**endpoint("metrics")), export_interval_millis=3_600_000
    )
    provider = MeterProvider(resource=Resource.create(GASTOWN), metric_readers=[reader])
    meter = provider.get_meter("gastown")
    calls = meter.create_counter("gastown.bd.calls.total", unit="1")
    duration = meter.create_histogram("gastown.bd.duration_ms", unit="ms")
    for status in ("ok", "ok", "ok", "error"):
        calls.add(1, {"subcommand": "show", "status": status})
    for ms in (3, 7, 40, 40, 900, 12_000):
        duration.record(ms, {"subcommand": "show"})
    provider.shutdown()  # collects and exports once more, as at the end of a process

    counters = {
        m.labels["status"]: m
        for m in RunMetric.objects.filter(name="gastown.bd.calls.total", source="otlp")
    }
    assert {status: m.value for status, m in counters.items()} == {"ok": 3.0, "error": 1.0}
    ok = counters["ok"]
    assert ok.run.run_id == RUN_ID and ok.unit == "1" and ok.histogram is None
    assert ok.labels["otel.temporality"] == "cumulative" and ok.labels["gt.agent"] == "Toast"
    assert "gt.run_id" not in ok.labels

    point = RunMetric.objects.get(name="gastown.bd.duration_ms")
    assert point.value == 12_990.0  # the sum
    hist = point.histogram
    # The SDK's default explicit buckets.
    assert hist["bounds"] == [
        0,
        5,
        10,
        25,
        50,
        75,
        100,
        250,
        500,
        750,
        1000,
        2500,
        5000,
        7500,
        10000,
    ]
    assert hist["counts"] == [0, 1, 1, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert (hist["count"], hist["sum"], hist["min"], hist["max"]) == (6, 12_990.0, 3, 12_000)
    assert point.labels["subcommand"] == "show"
    assert Run.objects.count() == 1
