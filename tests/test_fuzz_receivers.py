"""No input yields a 500 and nothing accepted is lost: every receiver fed valid bodies
with random parts replaced by values of every JSON type, and what the fuzzing found."""

from __future__ import annotations

import copy
import json
import random

import pytest

from telemetry.models import IngestBatch
from tests.fixtures.otlp.payloads import (
    CHILD,
    ROOT,
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

ODD = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5e308,
    "",
    "x" * 300,
    "\u0000",
    "\ud800",
    "zz",
    "18446744073709551616",
    [],
    [None],
    {},
    {"stringValue": 1},
    {"intValue": "1e3"},
    {"arrayValue": {"values": [{"kvlistValue": {}}]}},
]


@pytest.fixture
def post(client, token, django_capture_on_commit_callbacks):
    """POST a body with the project's token; the (eager) worker stores what is accepted."""

    def send(path: str, body: bytes, content_type: str = "application/json"):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(
                path, body, content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {token}"
            )

    return send


def assert_every_batch_stored() -> None:
    """What a request accepted, the worker stored: no batch failed or is left pending."""
    left = list(IngestBatch.objects.exclude(state="done").values_list("error", flat=True))
    assert not left, left[:3]
    assert IngestBatch.objects.exists()


def dumps(payload) -> bytes:
    # The stdlib writes what orjson refuses to: lone surrogates (escaped), huge integers.
    return json.dumps(payload).encode()


def paths(node, prefix=()):
    """Every place in a JSON tree, as a path of keys and indexes."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


def mutated(payload, rng: random.Random):
    out = copy.deepcopy(payload)
    places = [p for p in paths(out) if p]
    for _ in range(rng.randint(1, 3)):
        place = rng.choice(places)
        node = out
        try:
            for step in place[:-1]:
                node = node[step]
            node[place[-1]] = copy.deepcopy(rng.choice(ODD))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation changed the shape under this path
    return out


SEEDS = {
    "logs": to_json(
        logs_request(
            log("bd.call", attributes={"run.id": "r1", "n": 3}, trace_id="ab" * 16),
            log({"k": [1, 2.5, True]}, severity=17),
        )
    ),
    "traces": to_json(
        traces_request(
            span("root", ROOT, attributes={"run.id": "r1"}, events=[("e", 10, {"a": 1})]),
            span("child", CHILD, ROOT, status=(2, "boom")),
        )
    ),
    "metrics": to_json(
        metrics_request(
            sum_metric("calls", [(3, {"status": "ok"}), (1.5, {})]),
            gauge_metric("cost", 0.25),
            histogram_metric("duration", [10.0, 20.0], [1, 2, 0], 31.0),
        )
    ),
}


@pytest.mark.parametrize("signal", sorted(SEEDS))
def test_mutated_otlp_json_is_answered_without_a_500(post, signal):
    rng = random.Random(f"otlp-{signal}")
    for _ in range(60):
        body = dumps(mutated(SEEDS[signal], rng))
        response = post(f"/v1/{signal}", body, "application/json")
        assert response.status_code in (200, 400), (response.status_code, body[:300])
    assert_every_batch_stored()


def test_mutated_metric_bodies_are_answered_without_a_500(post):
    seed = {
        "metrics": [
            {"metric_name": "duration_ms", "metric_value": 12, "labels": {"model": "gpt-4o"}},
            {"metric_name": "tokens_in", "metric_value": 5, "recorded_at": "2026-04-21T05:12Z"},
        ]
    }
    rng = random.Random("metrics")
    for _ in range(80):
        body = dumps(mutated(seed, rng))
        response = post("/api/metrics/record", body, "application/json")
        assert response.status_code in (202, 400), (response.status_code, body[:300])
    assert_every_batch_stored()


# --- What the fuzzing found: text PostgreSQL refuses, in places no one cleaned ---------


def test_nul_and_lone_surrogates_in_identifiers_are_cleaned_not_fatal(post):
    from runs.models import Event, Run

    # Before: the run id and host reached PostgreSQL as sent and the batch failed.
    body = (
        b'{"ts":"2026-04-21T05:12:34Z","slug":"s","event":"a.b","run_id":"r\\u0000\\ud800",'
        b'"host":"h\\u0000ost","request_id":"q\\ud800"}\n'
    )
    response = post("/api/ingest/events", body, "application/x-ndjson")
    assert response.status_code == 202
    assert_every_batch_stored()
    run = Run.objects.get()
    assert (run.run_id, run.host) == ("r\ufffd", "host")
    assert Event.objects.get().request_id == "q\ufffd"


def test_otlp_text_that_postgresql_refuses_is_cleaned_in_every_signal(post):
    from runs.models import Run, RunMetric
    from telemetry.models import Span

    resource = {"key": "service.name", "value": {"stringValue": "svc\u0000\ud800"}}
    logs = {
        "resourceLogs": [
            {
                "resource": {"attributes": [resource]},
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": "1776748354123000000",
                                "body": {"stringValue": "bd.call"},
                                "attributes": [
                                    {"key": "run.id", "value": {"stringValue": "r\u00001"}},
                                    {"key": "gt.role", "value": {"stringValue": "\ud800x"}},
                                ],
                            }
                        ]
                    }
                ],
            }
        ]
    }
    traces = {
        "resourceSpans": [
            {
                "resource": {"attributes": [resource]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "ab" * 16,
                                "spanId": "cd" * 8,
                                "name": "span\ud800\u0000",
                                "startTimeUnixNano": "1776748354123000000",
                                "endTimeUnixNano": "1776748354223000000",
                            }
                        ]
                    }
                ],
            }
        ]
    }
    metrics = {
        "resourceMetrics": [
            {
                "resource": {"attributes": [resource]},
                "scopeMetrics": [
                    {
                        "metrics": [
                            {
                                "name": "calls\ud800\u0000",
                                "unit": "\u00001",
                                "gauge": {
                                    "dataPoints": [
                                        {"asDouble": 1.0, "timeUnixNano": "1776748354123000000"}
                                    ]
                                },
                            }
                        ]
                    }
                ],
            }
        ]
    }
    for signal, payload in (("logs", logs), ("traces", traces), ("metrics", metrics)):
        response = post(f"/v1/{signal}", dumps(payload))
        assert response.status_code == 200, (signal, response.content)
    assert_every_batch_stored()
    assert Run.objects.get(run_id="r1").attributes["gt.role"] == "\ufffdx"
    assert Span.objects.get().name == "span\ufffd"
    assert Span.objects.get().service == "svc\ufffd"
    assert RunMetric.objects.get().name == "calls\ufffd"


GITOMA = {
    "ts": "2026-04-21T05:12:34Z",
    "slug": "o__r",
    "phase": "WORKING",
    "level": "info",
    "event": "llm.call",
    "run_id": "r1",
    "seq": 3,
    "message": "m",
    "pid": 12,
    "host": "h",
    "request_id": "q",
    "trace_id": "ab" * 16,
    "data": {
        "model": "gpt-4o",
        "tokens_in": 10,
        "usage": {"prompt_tokens": 3},
        "exit_code": 0,
        "tags": ["a"],
        "parent_run_id": "p",
        "error": {"type": "E", "message": "x"},
    },
}


def test_mutated_events_are_answered_without_a_500_and_stored(post):
    rng = random.Random("events")
    lifecycle = ["run.begin", "run.crashed", "run.exit_clean", "phase.start", "llm.call"]
    for _ in range(60):
        records = [mutated({**GITOMA, "event": rng.choice(lifecycle)}, rng) for _ in range(2)]
        body = b"".join(dumps(r) + b"\n" for r in records)
        response = post("/api/ingest/events", body, "application/x-ndjson")
        assert response.status_code in (202, 400), (response.status_code, body[:300])
    assert_every_batch_stored()


def test_mutated_heartbeats_and_beacons_are_answered_without_a_500(client, token, project):
    rng = random.Random("heartbeats")
    beacon = {
        "level": "error",
        "message": "TypeError: x is undefined",
        "stack": "at f (https://app.example.com/a.js:1:2)",
        "context": {"url": "https://app.example.com/", "ua": "u", "build": "1"},
    }
    for i in range(60):
        heartbeat = mutated({"phase": "WORKING", "pid": 1, "host": "h"}, rng)
        response = client.post(
            "/api/runs/r1/heartbeat",
            dumps(heartbeat),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
        assert response.status_code in (200, 400), (response.status_code, heartbeat)
        report = mutated(beacon, rng)
        response = client.post(
            f"/api/frontend-log?key={project.public_key}",
            dumps(report),
            content_type="text/plain",
            REMOTE_ADDR=f"10.0.0.{i}",  # one client each: the per-address limit stays out
        )
        assert response.status_code in (202, 400), (response.status_code, report)
