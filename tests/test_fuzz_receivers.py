"""No input yields a 500 and nothing accepted is lost, as Hypothesis properties: every
receiver is fed valid bodies with random parts replaced by values of every JSON type
(and raw bytes, compressed or not); each answer is a 2xx or a 4xx, and every batch a
request accepted is stored by the worker. Then what the fuzzing found, kept as examples.

Bounded and repeatable for CI: a fixed number of examples, derandomized (the same
inputs on every run), no example database. `pytest -m fuzz` runs these alone.
"""

from __future__ import annotations

import copy
import gzip
import itertools
import json
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runs.models import LEVEL_ALIASES
from telemetry.ingest.redaction import is_secret_key, may_hold_secret
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
from tests.test_sentry_receiver import envelope

pytestmark = pytest.mark.fuzz

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    # The database fixtures are per test, not per example: each example adds its rows
    # to the same transaction, which is what a live portal sees too.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
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
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# What replaces a part of a valid body: the values that found bugs before, or anything.
REPLACEMENT = st.sampled_from(ODD) | JSON


def dumps(payload) -> bytes:
    # The stdlib writes what orjson refuses to: lone surrogates (escaped), huge integers,
    # and the infinities (as Infinity, which no JSON reader should accept).
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


@st.composite
def mutated(draw, payload):
    """`payload` with one to three of its parts replaced."""
    out = copy.deepcopy(payload)
    places = [p for p in paths(out) if p]
    for _ in range(draw(st.integers(1, 3))):
        place = draw(st.sampled_from(places))
        node = out
        try:
            for step in place[:-1]:
                node = node[step]
            node[place[-1]] = draw(REPLACEMENT)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement changed the shape under this path
    return out


@st.composite
def encoded(draw, body: bytes) -> tuple[bytes, dict]:
    """The body as sent, compressed or not, whole or cut short."""
    how = draw(st.sampled_from(["plain", "plain", "gzip", "cut gzip"]))
    if how == "plain":
        return body, {}
    packed = gzip.compress(body)
    if how == "cut gzip":
        packed = packed[: draw(st.integers(0, len(packed) - 1))]
    return packed, {"HTTP_CONTENT_ENCODING": "gzip"}


@pytest.fixture
def post(client, token, settings, django_capture_on_commit_callbacks):
    """POST a body with the project's token; the (eager) worker stores what is accepted.
    No rate limit: a 429 after the first thousand requests would hide the rest."""
    settings.INGEST_RATE_PER_MINUTE = 0

    def send(path: str, body: bytes, content_type: str = "application/json", **headers):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(
                path,
                body,
                content_type=content_type,
                HTTP_AUTHORIZATION=f"Bearer {token}",
                **headers,
            )

    return send


def assert_every_batch_stored() -> None:
    """What a request accepted, the worker stored: no batch failed or is left pending."""
    left = list(IngestBatch.objects.exclude(state="done").values_list("error", flat=True))
    assert not left, left[:3]


def assert_answered(response, *good: int) -> None:
    assert response.status_code < 500, response.content[:300]
    assert response.status_code in good or 400 <= response.status_code < 500, response.status_code


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
PROTOBUF = {
    "logs": logs_request(log("bd.call", attributes={"run.id": "r1"})).SerializeToString(),
    "traces": traces_request(span("root", ROOT, attributes={"run.id": "r1"})).SerializeToString(),
    "metrics": metrics_request(gauge_metric("cost", 0.25)).SerializeToString(),
}


# --- Every receiver: any body is answered with a 2xx or a 4xx, what is accepted is stored


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """Bytes a protobuf reader must survive: random, cut short, or with bytes changed."""
    how = draw(st.sampled_from(["random", "cut", "changed"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "cut":
        return blob[: draw(st.integers(0, len(blob)))]
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


@pytest.mark.parametrize("signal", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_any_otlp_json_body_is_answered_and_what_is_accepted_is_stored(post, signal, data):
    body, headers = data.draw(encoded(dumps(data.draw(mutated(SEEDS[signal])))))
    assert_answered(post(f"/v1/{signal}", body, "application/json", **headers), 200)
    assert_every_batch_stored()


@pytest.mark.parametrize("signal", sorted(PROTOBUF))
@FUZZ
@given(data=st.data())
def test_any_otlp_protobuf_body_is_answered_and_what_is_accepted_is_stored(post, signal, data):
    body, headers = data.draw(encoded(data.draw(damaged(PROTOBUF[signal]))))
    assert_answered(post(f"/v1/{signal}", body, "application/x-protobuf", **headers), 200)
    assert_every_batch_stored()


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
LIFECYCLE = ["run.begin", "run.crashed", "run.exit_clean", "phase.start", "llm.call"]
EVENT_RECORD = st.sampled_from(LIFECYCLE).flatmap(lambda e: mutated({**GITOMA, "event": e}))


@FUZZ
@given(
    records=st.lists(EVENT_RECORD | JSON, min_size=1, max_size=3),
    as_array=st.booleans(),
    data=st.data(),
)
def test_any_events_body_is_answered_and_what_is_accepted_is_stored(post, records, as_array, data):
    body = dumps(records) if as_array else b"".join(dumps(r) + b"\n" for r in records)
    body, headers = data.draw(encoded(body))
    assert_answered(post("/api/ingest/events", body, "application/x-ndjson", **headers), 202)
    assert_every_batch_stored()


METRICS = {
    "metrics": [
        {"metric_name": "duration_ms", "metric_value": 12, "labels": {"model": "gpt-4o"}},
        {"metric_name": "tokens_in", "metric_value": 5, "recorded_at": "2026-04-21T05:12Z"},
    ]
}


@FUZZ
@given(data=st.data())
def test_any_metrics_body_is_answered_and_what_is_accepted_is_stored(post, data):
    payload = data.draw(mutated(METRICS) | JSON)
    body, headers = data.draw(encoded(dumps(payload)))
    assert_answered(post("/api/metrics/record", body, "application/json", **headers), 202)
    assert_every_batch_stored()


SENTRY_EVENT = {
    "event_id": "9ec79c33ec9942ab8353589fcb2e04dc",
    "message": "boom",
    "level": "error",
    "platform": "python",
    "tags": {"run_id": "r1"},
    "exception": {
        "values": [
            {
                "type": "ValueError",
                "value": "bad",
                "stacktrace": {"frames": [{"filename": "a.py", "function": "f", "lineno": 3}]},
            }
        ]
    },
}


@FUZZ
@given(data=st.data(), endpoint=st.sampled_from(["envelope", "store"]))
def test_any_sentry_body_is_answered_and_what_is_accepted_is_stored(
    client, project, settings, django_capture_on_commit_callbacks, data, endpoint
):
    settings.INGEST_RATE_PER_MINUTE = 0
    event = data.draw(mutated(SENTRY_EVENT))
    if endpoint == "store":
        body = dumps(event)
    else:
        body = data.draw(
            st.sampled_from(
                [
                    envelope(({"type": "event"}, dumps(event))),
                    envelope(({"type": "transaction"}, dumps(event)), ({"type": "session"}, b"{}")),
                ]
            )
            | st.binary(max_size=200)
        )
    body, headers = data.draw(encoded(body))
    auth = f"Sentry sentry_version=7, sentry_key={project.public_key}"
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            f"/api/{project.pk}/{endpoint}/",
            body,
            content_type="application/x-sentry-envelope",
            HTTP_X_SENTRY_AUTH=auth,
            **headers,
        )
    assert_answered(response, 200)
    assert_every_batch_stored()


ADDRESSES = (f"10.{i // 250}.{i % 250}.1" for i in itertools.count())
BEACON = {
    "level": "error",
    "message": "TypeError: x is undefined",
    "stack": "at f (https://app.example.com/a.js:1:2)",
    "context": {"url": "https://app.example.com/", "ua": "u", "build": "1"},
}


@FUZZ
@given(
    heartbeat=mutated({"phase": "WORKING", "pid": 1, "host": "h"}) | JSON,
    report=mutated(BEACON) | JSON,
)
def test_any_heartbeat_or_beacon_is_answered_without_a_500(
    client, token, project, heartbeat, report
):
    response = client.post(
        "/api/runs/r1/heartbeat",
        dumps(heartbeat),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert_answered(response, 200)
    response = client.post(
        f"/api/frontend-log?key={project.public_key}",
        dumps(report),
        content_type="text/plain",
        REMOTE_ADDR=next(ADDRESSES),  # one client each: the per-address limit stays out
    )
    assert_answered(response, 202)


@FUZZ
@given(data=st.data(), name=st.sampled_from(["diff.patch", "summary.md", "a b.txt", "x"]))
def test_any_artifact_body_is_answered_without_a_500(client, token, settings, data, name):
    settings.INGEST_RATE_PER_MINUTE = 0
    body, headers = data.draw(encoded(data.draw(st.binary(max_size=500))))
    response = client.put(
        f"/api/runs/r1/artifacts/{name}",
        body,
        content_type="application/octet-stream",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        **headers,
    )
    assert_answered(response, 201)


# --- What the ingest accepts comes back identical from format=jsonl ---------------------

# Integers beyond 64 bits are bounded, not kept (docs/decisions.md, "Bounds"). Text that
# reaches the database as sent: no NUL or lone surrogate (cleaned to U+FFFD)
# and nothing redaction would touch (docs/decisions.md, "Secrets" and "Bounds").
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=24)
SAFE = TEXT.filter(lambda t: not may_hold_secret(t))
KEY = SAFE.filter(lambda k: not is_secret_key(k))
DATA = st.dictionaries(
    KEY,
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | SAFE,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
        max_leaves=10,
    ),
    max_size=4,
)
MOMENT = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))
# Offsets PostgreSQL takes and those only Python reads (beyond ±15:59) alike.
OFFSET = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def written(draw, moment: datetime) -> str:
    """One instant as agents write it: with Z, +00:00 or another offset."""
    form = draw(st.sampled_from(["Z", "+00:00", "offset"]))
    if form == "offset":
        return moment.astimezone(draw(OFFSET)).isoformat(timespec="milliseconds")
    return moment.isoformat(timespec="milliseconds").replace("+00:00", form)


@st.composite
def gitoma_records(draw) -> tuple[dict, dict]:
    """A record as sent, and as format=jsonl must give it back."""
    moment = draw(MOMENT)
    level = draw(st.sampled_from(sorted(LEVEL_ALIASES)))
    event = draw(SAFE.filter(lambda e: e.strip() == e and 0 < len(e) <= 200))
    phase = draw(SAFE.filter(lambda p: p.strip() == p))
    data = draw(DATA)
    sent = {"ts": draw(written(moment)), "slug": "o__r", "phase": phase, "level": level}
    sent |= {"event": event, "data": data}
    back = {**sent, "ts": moment.isoformat(timespec="milliseconds"), "level": LEVEL_ALIASES[level]}
    return sent, back


def same(a, b) -> bool:
    """JSON values equal, numbers by value (jsonb writes 1e16 as 10000000000000000)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is int and type(b) is int:
        return a == b
    if type(a) in (int, float) and type(b) in (int, float):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


RUN_IDS = (f"round-trip-{i}" for i in itertools.count())
JUNK = JSON.filter(lambda v: not isinstance(v, dict))  # never a record: always rejected


@FUZZ
@given(lines=st.lists(gitoma_records() | JUNK, min_size=1, max_size=6), as_array=st.booleans())
def test_what_the_ingest_accepts_comes_back_identical_from_jsonl(
    post, client, token, lines, as_array
):
    run_id = next(RUN_IDS)
    sent = [line[0] if isinstance(line, tuple) else line for line in lines]
    # A body that starts with `[` is read as one JSON array (docs/decisions.md).
    assume(as_array or not isinstance(sent[0], list))
    body = dumps(sent) if as_array else b"".join(dumps(r) + b"\n" for r in sent)
    response = post(f"/api/ingest/events?run_id={run_id}", body, "application/x-ndjson")
    expected = [line[1] for line in lines if isinstance(line, tuple)]
    if not expected:
        assert response.status_code == 400
        return
    assert response.status_code == 202, response.content
    answer = response.json()
    assert answer["accepted"] == len(expected)
    assert {e["line"] for e in answer["errors"]} == {
        n for n, line in enumerate(lines, 1) if not isinstance(line, tuple)
    }
    assert_every_batch_stored()

    export = client.get(
        f"/api/runs/{run_id}/events", {"format": "jsonl"}, HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    got = [orjson.loads(line) for line in b"".join(export.streaming_content).splitlines()]
    assert len(got) == len(expected)
    for record, want in zip(got, expected, strict=True):
        assert same(record, want), (record, want)


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
