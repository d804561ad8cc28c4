"""How OTLP logs, spans and metric points become events, spans and run metrics."""

from __future__ import annotations

import orjson
import pytest

from runs.models import Event, Project, Run, RunMetric
from telemetry.models import IngestBatch, Span
from tests.fixtures.otlp.payloads import (
    CHILD,
    GASTOWN,
    GRANDCHILD,
    ROOT,
    T0,
    TRACE,
    gauge_metric,
    histogram_metric,
    log,
    logs_request,
    metrics_request,
    span,
    sum_metric,
    to_json,
    traces_request,
)

# --- One shape for both encodings ---------------------------------------------------


def _gastown_logs():
    return logs_request(
        log("session.start", attributes={"session": "gt-gastown-Toast", "gt.run_id": "run-1"}),
        log(
            "prime",
            attributes={
                "run.id": "run-1",
                "work_rig": "gastown",
                "work_bead": "sg-05iq",
                "work_mol": "mol-polecat-work",
                "nested": {"list": [1, 2.5, True, None, b"\x00\xff"], "deep": {"x": "y"}},
            },
            trace_id=TRACE,
            span_id=CHILD,
        ),
        log(
            {"structured": ["body", 3]},
            severity=17,
            severity_text="ERROR",
            attributes={"run.id": "run-1", "status": "error"},
        ),
    )


def _rows(project: Project) -> dict[str, list]:
    events = Event.objects.filter(run__project=project).order_by("run__run_id", "seq")
    spans = Span.objects.filter(project=project).order_by("span_id")
    metrics = RunMetric.objects.filter(project=project).order_by("name", "id")
    return {
        "events": list(
            events.values_list(
                "run__run_id",
                "run__slug",
                "seq",
                "ts",
                "level",
                "event",
                "message",
                "data",
                "trace_id",
                "span_id",
            )
        ),
        "spans": list(
            spans.values_list(
                "run__run_id",
                "trace_id",
                "span_id",
                "parent_span_id",
                "name",
                "kind",
                "service",
                "start_time",
                "end_time",
                "duration_ms",
                "status_code",
                "status_message",
                "attributes",
                "resource",
                "events",
            )
        ),
        "metrics": list(
            metrics.values_list(
                "run__run_id", "name", "value", "unit", "labels", "recorded_at", "histogram"
            )
        ),
        "runs": list(
            Run.objects.filter(project=project)
            .order_by("run_id")
            .values_list("run_id", "slug", "status", "attributes")
        ),
    }


def test_it_stores_identical_rows_from_protobuf_and_from_otlp_json(
    client, project, token, stranger, post_otlp
):
    spans = traces_request(
        span("agent.run", ROOT, status=(2, "tool failed")),
        span("llm.call", CHILD, ROOT, events=[("retry", 5_000, {"attempt": 2})]),
    )
    metrics = metrics_request(
        sum_metric("gastown.bd.calls.total", [(3, {"status": "ok"}), (1, {"status": "error"})]),
        gauge_metric("gastown.token.cost_usd", 0.125, {"run.id": "run-1"}),
        histogram_metric("gastown.bd.duration_ms", [10.0, 100.0], [2, 5, 1], 1234.5),
    )
    for message, signal in ((_gastown_logs(), "logs"), (spans, "traces"), (metrics, "metrics")):
        post_otlp(signal, message)
        post_otlp(signal, message, json=True, auth=stranger[1])

    ours, theirs = _rows(project), _rows(stranger[0])
    assert len(ours["events"]) == 3 and len(ours["spans"]) == 2 and len(ours["metrics"]) == 4
    assert ours == theirs


def test_it_keeps_hex_ids_exactly_as_sent_in_json(post_otlp, project):
    payload = to_json(traces_request(span("s", CHILD, ROOT)))
    payload["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = TRACE.upper()
    post_otlp("traces", payload, json=True)
    assert list(Span.objects.values_list("trace_id", "span_id", "parent_span_id")) == [
        (TRACE, CHILD, ROOT)
    ]


# --- Logs -> events ---------------------------------------------------------------------


def test_it_names_events_from_event_name_then_a_name_like_body_then_otel_log(post_otlp):
    post_otlp(
        "logs",
        logs_request(
            log("ignored body", attributes={"event.name": "agent.usage", "run.id": "r"}),
            log("whatever", event_name="mail", attributes={"run.id": "r"}),
            log("prime.context", attributes={"run.id": "r"}),
            log("Polecat Toast spawned in 2.1s", attributes={"run.id": "r"}),
            log(None, attributes={"run.id": "r"}),
        ),
    )
    events = list(Event.objects.order_by("seq").values_list("event", "message"))
    assert events == [
        ("agent.usage", "ignored body"),
        ("mail", "whatever"),
        ("prime.context", "prime.context"),
        ("otel.log", "Polecat Toast spawned in 2.1s"),
        ("otel.log", ""),
    ]


@pytest.mark.parametrize(
    ("number", "text", "level"),
    [
        (1, "", "debug"),  # TRACE
        (5, "", "debug"),
        (9, "", "info"),
        (12, "", "info"),
        (13, "", "warn"),
        (17, "", "error"),
        (21, "", "error"),  # FATAL
        (0, "WARNING", "warn"),
        (0, "Error", "error"),
        (0, "", "info"),
        (0, "chatty", "info"),
    ],
)
def test_it_maps_severity_numbers_and_texts_to_levels(post_otlp, number, text, level):
    post_otlp("logs", logs_request(log("x", severity=number, severity_text=text)))
    assert Event.objects.get().level == level


def test_it_keeps_resource_scope_and_record_attributes_and_the_ids(post_otlp):
    post_otlp("logs", _gastown_logs())
    prime = Event.objects.get(event="prime")
    assert prime.data["service.name"] == "gastown"
    assert prime.data["gt.agent"] == "Toast"
    assert prime.data["otel.scope.name"] == "gt"
    assert prime.data["work_bead"] == "sg-05iq"
    assert prime.data["nested"] == {"list": [1, 2.5, True, None, "AP8="], "deep": {"x": "y"}}
    assert (prime.trace_id, prime.span_id) == (TRACE, CHILD)
    # The exporter's process.pid is the record's, not a promise of the run's life:
    # kept in the data, never the run's pid (which would make it an orphan candidate).
    assert prime.data["process.pid"] == 4242 and prime.run.pid is None
    assert prime.run.host == "polecat-host"
    error = Event.objects.get(level="error")
    assert error.event == "otel.log"
    assert error.data["body"] == {"structured": ["body", 3]}
    assert orjson.loads(error.message) == {"structured": ["body", 3]}
    assert error.data["otel.severity"] == "ERROR"


def test_it_correlates_records_to_runs_by_run_id_attributes(post_otlp):
    post_otlp(
        "logs",
        logs_request(
            log("session.start"),  # the resource's gt.run_id names the run
            log("bd.call", attributes={"run.id": "run-7"}),  # the record's own wins
            resource={**GASTOWN, "gt.run_id": "run-6"},
        ),
    )
    post_otlp(
        "logs",
        logs_request(log("mail", attributes={"session.id": "sess-1"}), resource=GASTOWN),
    )
    runs = dict(Event.objects.values_list("event", "run__run_id"))
    assert runs == {"session.start": "run-6", "bd.call": "run-7", "mail": "sess-1"}
    assert set(Run.objects.values_list("slug", flat=True)) == {"gastown"}


def test_it_gives_uncorrelated_records_a_run_per_trace_or_per_service_and_day(post_otlp):
    post_otlp(
        "logs",
        logs_request(
            log("with.trace", trace_id=TRACE, span_id=CHILD),
            log("no.trace"),
            resource={"service.name": "codebuddy"},
        ),
    )
    runs = dict(Event.objects.values_list("event", "run__run_id"))
    assert runs == {"with.trace": f"trace-{TRACE}", "no.trace": "codebuddy@2026-04-21"}
    assert set(Run.objects.values_list("slug", flat=True)) == {"codebuddy"}


def test_it_takes_the_slug_from_the_configured_attributes(post_otlp, settings):
    settings.OTLP_SLUG_ATTRIBUTES = ["work_rig", "service.name"]
    post_otlp(
        "logs",
        logs_request(
            log("prime", attributes={"run.id": "a", "work_rig": "sfgastown"}),
            log("done", attributes={"run.id": "b"}),
        ),
    )
    assert dict(Run.objects.values_list("run_id", "slug")) == {"a": "sfgastown", "b": "gastown"}


def test_it_puts_the_newest_work_context_on_the_run(post_otlp):
    prime = {"run.id": "run-1", "work_rig": "gastown", "work_bead": "sg-05iq", "work_mol": "m1"}
    post_otlp("logs", logs_request(log("session.start", attributes={"run.id": "run-1"})))
    post_otlp("logs", logs_request(log("prime", attributes=prime)))
    run = Run.objects.get(run_id="run-1")
    assert run.attributes["work_bead"] == "sg-05iq"
    assert run.attributes["gt.role"] == "gastown/polecats/Toast"
    assert run.attributes["service.name"] == "gastown"
    # The next prime moves the polecat to other work: the run follows.
    resource = {**GASTOWN, "gt.work_rig": "sfgastown", "gt.work_bead": "sg-g8vs"}
    post_otlp(
        "logs", logs_request(log("bd.call", attributes={"run.id": "run-1"}), resource=resource)
    )
    run.refresh_from_db()
    assert (run.attributes["work_rig"], run.attributes["work_bead"]) == ("sfgastown", "sg-g8vs")
    bd_call = Event.objects.get(event="bd.call")
    assert bd_call.data["work_bead"] == "sg-g8vs"
    assert run.events_count == 3


def test_it_bounds_attribute_counts_and_lengths_and_marks_the_cut(post_otlp, settings):
    settings.OTLP_MAX_ATTRIBUTE_LENGTH = 100
    many = {f"k{i:03}": i for i in range(300)}
    post_otlp(
        "logs",
        logs_request(
            log("big", attributes={"run.id": "r", **many}),
            log("long", attributes={"run.id": "r", "stdout": "x" * 5000}),
            log("small", attributes={"run.id": "r"}),
        ),
    )
    big, long, small = (Event.objects.get(event=n) for n in ("big", "long", "small"))
    assert len([k for k in big.data if k.startswith("k")]) == 127  # run.id came first
    assert big.data["_truncated"] is True
    assert long.data["stdout"] == "x" * 99 + "…" and long.data["_truncated"] is True
    assert "_truncated" not in small.data


def test_it_redacts_secrets_in_log_attributes_and_bodies(post_otlp):
    post_otlp(
        "logs",
        logs_request(
            log(
                "git clone https://bob:ghp_abcdefghijklmnopqrstuvwxyz0123@github.com/x/y",
                attributes={"api_key": "sk-live-123", "cmd": "curl -H 'Authorization: Bearer abc'"},
            )
        ),
    )
    event = Event.objects.get()
    assert event.data["api_key"] == "[redacted]"
    assert "abc" not in event.data["cmd"]
    assert "ghp_" not in event.message and "bob" not in event.message


# --- Spans ------------------------------------------------------------------------------


def test_it_stores_spans_with_parents_events_and_status(post_otlp):
    post_otlp(
        "traces",
        traces_request(
            span("agent.run", ROOT, kind=2, end=T0 + 2_000_000_000, status=(2, "tool failed")),
            span(
                "tool.bash",
                CHILD,
                ROOT,
                start=T0 + 10_000_000,
                attributes={"tool.name": "bash", "exit_code": 1},
                events=[("exception", 1_000, {"exception.type": "TimeoutError"})],
            ),
        ),
    )
    root = Span.objects.get(span_id=ROOT)
    child = Span.objects.get(span_id=CHILD)
    assert (root.parent_span_id, child.parent_span_id) == ("", ROOT)
    assert (root.kind, root.status_code, root.status_message) == (2, 2, "tool failed")
    assert root.duration_ms == 2000.0 and child.duration_ms == 250.0
    assert root.service == "codebuddy"
    assert root.resource == {"service.name": "codebuddy"}
    assert child.attributes == {"tool.name": "bash", "exit_code": 1}
    assert child.events == [
        {
            "name": "exception",
            "time": "2026-04-21T05:12:34.133001+00:00",
            "attributes": {"exception.type": "TimeoutError"},
        }
    ]


def test_it_makes_a_trace_its_own_run_and_the_root_span_finishes_it(post_otlp):
    post_otlp("traces", traces_request(span("llm.call", CHILD, ROOT, start=T0 + 1000)))
    run = Run.objects.get()
    assert (run.run_id, run.slug, run.status) == (f"trace-{TRACE}", "codebuddy", "running")
    post_otlp(
        "traces", traces_request(span("agent.run", ROOT, end=T0 + 3_000_000_000, status=(2, "x")))
    )
    run.refresh_from_db()
    assert (run.status, run.duration_ms, run.exit_clean) == ("failed", 3000, True)
    assert run.spans.count() == 2


def test_it_accepts_children_before_parents_across_requests(post_otlp):
    post_otlp("traces", traces_request(span("grandchild", GRANDCHILD, CHILD)))
    post_otlp("traces", traces_request(span("child", CHILD, ROOT)))
    post_otlp("traces", traces_request(span("root", ROOT)))
    tree = dict(Span.objects.values_list("name", "parent_span_id"))
    assert tree == {"grandchild": CHILD, "child": ROOT, "root": ""}
    assert Run.objects.get().status == "succeeded"


def test_it_stores_a_retried_export_once(post_otlp):
    request = traces_request(span("a", ROOT), span("b", CHILD, ROOT))
    post_otlp("traces", request)
    post_otlp("traces", request, gz=True)
    post_otlp("traces", request, json=True)
    assert Span.objects.count() == 2
    # In the order they were sent: an unordered read follows the heap, which updates reorder.
    stored = IngestBatch.objects.order_by("id").values_list("summary__stored", flat=True)
    assert list(stored) == [2, 0, 0]


def test_it_attaches_spans_to_the_run_their_attributes_name(post_otlp):
    post_otlp("logs", logs_request(log("session.start", attributes={"run.id": "run-1"})))
    post_otlp(
        "traces",
        traces_request(span("gt.session", ROOT), resource={**GASTOWN, "gt.run_id": "run-1"}),
    )
    run = Run.objects.get()
    assert run.run_id == "run-1" and run.spans.get().name == "gt.session"
    assert run.status == "running"  # a run named by the agent finishes by its own events
    assert run.attributes["gt.agent"] == "Toast"


def test_a_trace_follows_the_run_one_of_its_spans_names(post_otlp):
    # Only the root names the run, and a root ends, so is exported, last: its children
    # arrive first, in the trace's own run, and move to the named run with it.
    post_otlp("traces", traces_request(span("tool.bash", GRANDCHILD, CHILD)))
    post_otlp("traces", traces_request(span("llm.call", CHILD, ROOT, start=T0 - 10**9)))
    assert Run.objects.get().run_id == f"trace-{TRACE}"
    post_otlp(
        "traces",
        traces_request(span("agent.run", ROOT, start=T0 - 2 * 10**9, attributes={"run.id": "r7"})),
    )
    run = Run.objects.get()  # the trace's own run is gone: nothing else was in it
    assert run.run_id == "r7"
    assert sorted(run.spans.values_list("name", flat=True)) == [
        "agent.run",
        "llm.call",
        "tool.bash",
    ]
    assert run.started_at == Span.objects.get(name="agent.run").start_time
    # Later spans and log records of the trace that name no run join it too.
    later = "eee19b7ec3c1b176"
    post_otlp("traces", traces_request(span("tool.read", later, CHILD)))
    post_otlp("logs", logs_request(log("bd.call", trace_id=TRACE, span_id=later)))
    assert Run.objects.get().run_id == "r7"
    assert run.spans.count() == 4 and run.events.get().event == "bd.call"


def test_spans_of_one_export_follow_the_run_their_trace_names(post_otlp):
    post_otlp(
        "traces",
        traces_request(
            span("llm.call", CHILD, ROOT),
            span("agent.run", ROOT, attributes={"run.id": "r8"}),
        ),
    )
    assert list(Run.objects.values_list("run_id", flat=True)) == ["r8"]
    assert Run.objects.get().spans.count() == 2


def test_it_puts_a_spans_work_context_on_its_run(post_otlp):
    post_otlp(
        "traces",
        traces_request(
            span("bd.call", CHILD, ROOT, attributes={"work_bead": "sg-g8vs"}),
            resource={**GASTOWN, "gt.work_bead": "sg-05iq"},
        ),
    )
    run = Run.objects.get()
    assert (run.attributes["work_bead"], run.attributes["gt.rig"]) == ("sg-g8vs", "gastown")


def test_it_redacts_and_bounds_span_attributes(post_otlp, settings):
    settings.OTLP_MAX_ATTRIBUTE_LENGTH = 50
    post_otlp(
        "traces",
        traces_request(
            span(
                "http",
                ROOT,
                attributes={
                    "http.request.header.authorization": "Bearer s3cr3t-t0ken",
                    "url.full": "https://user:pw@example.com/path",
                    "payload": "y" * 200,
                    **{f"a{i}": i for i in range(200)},
                },
            )
        ),
    )
    attrs = Span.objects.get().attributes
    assert "s3cr3t" not in orjson.dumps(attrs).decode()
    assert "user:pw" not in attrs["url.full"]
    assert attrs["payload"] == "y" * 49 + "…"
    assert attrs["_truncated"] is True and len(attrs) == 129


# --- Metrics ------------------------------------------------------------------------------


def test_it_stores_sums_and_gauges_with_labels_and_temporality(post_otlp):
    post_otlp(
        "metrics",
        metrics_request(
            sum_metric("gastown.bd.calls.total", [(3, {"status": "ok"}), (1.5, {"status": "x"})]),
            gauge_metric("gastown.token.cost_usd", 0.25),
        ),
    )
    calls = RunMetric.objects.filter(name="gastown.bd.calls.total").order_by("value")
    assert [m.value for m in calls] == [1.5, 3.0]
    labels = calls.last().labels
    assert labels["status"] == "ok" and labels["otel.temporality"] == "cumulative"
    assert labels["otel.monotonic"] is True
    assert labels["service.name"] == "gastown" and labels["gt.role"] == "gastown/polecats/Toast"
    cost = RunMetric.objects.get(name="gastown.token.cost_usd")
    assert (cost.value, cost.unit, cost.source, cost.histogram, cost.run) == (
        0.25,
        "USD",
        "otlp",
        None,
        None,
    )
    assert "otel.temporality" not in cost.labels
    assert calls.first().recorded_at.isoformat() == "2026-04-21T05:12:34.123000+00:00"


def test_it_stores_a_histogram_point_with_its_buckets(post_otlp):
    post_otlp(
        "metrics",
        metrics_request(histogram_metric("gastown.bd.duration_ms", [10, 100], [2, 5, 1], 812.5)),
    )
    point = RunMetric.objects.get()
    assert point.value == 812.5 and point.unit == "ms"
    assert point.histogram == {
        "bounds": [10.0, 100.0],
        "counts": [2, 5, 1],
        "sum": 812.5,
        "count": 8,
        "min": 1.0,
        "max": 900.0,
    }
    assert point.labels["otel.temporality"] == "delta"


def test_it_correlates_points_to_runs_and_drops_the_run_label(post_otlp):
    post_otlp(
        "metrics",
        metrics_request(
            gauge_metric("gastown.token.cost_usd", 1.5, {"run.id": "run-9"}),
            resource={**GASTOWN, "gt.run_id": "run-8"},
        ),
    )
    point = RunMetric.objects.get()
    assert point.run.run_id == "run-9" and point.run.slug == "gastown"
    assert "run.id" not in point.labels and "gt.run_id" not in point.labels


def test_the_request_and_the_worker_reach_the_same_verdicts():
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

    from telemetry.otlp.codec import decode

    exponential = Metric(name="e")
    exponential.exponential_histogram.data_points.add(time_unix_nano=1)
    requests = {
        "logs": logs_request(log("ok"), log("bad", trace_id="abcd"), log({"k": [1]})),
        "traces": traces_request(span("ok", ROOT), span("bad", CHILD, "abcd")),
        "metrics": metrics_request(gauge_metric("g", float("inf")), exponential),
    }
    for signal, request in requests.items():
        body = request.SerializeToString()
        full, counted = decode(signal, body, False), decode(signal, body, False, full=False)
        assert (len(counted.items), counted.rejected, counted.reasons) == (
            len(full.items),
            full.rejected,
            full.reasons,
        )
        assert full.rejected >= 1
