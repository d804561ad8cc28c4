"""A Sentry event as SDKs send it, made into the event Runlens stores and an occurrence.

The Python events come from the real `sentry-sdk`, its envelopes kept in memory by a
transport of ours (no network); the browser and Node events are written as those
SDKs send them; the bash one is GitTinkerer's `lib/sentry.sh` payload (seed 001).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from telemetry.errors import store
from telemetry.models import ErrorGroup, ErrorReport
from telemetry.sentry.events import format_message, iso_timestamp, normalized, occurrence

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 4, 21, 5, 12, 34, tzinfo=UTC)


@contextmanager
def sentry(**options) -> Iterator[list[dict]]:
    """The real Python SDK for one block; yields the events it sent, as JSON."""
    events: list[dict] = []

    class Keep(Transport):
        def capture_envelope(self, envelope):
            events.extend(item.payload.json for item in envelope.items if item.type == "event")

    settings = {
        "dsn": "http://public@localhost/1",
        "transport": Keep,
        "default_integrations": False,  # no Django, threading or atexit hooks in tests
        "auto_enabling_integrations": False,
        "project_root": str(ROOT),  # frames of this repository are in app
        **options,
    }
    with sentry_sdk.isolation_scope() as scope:
        # The logging integration, once installed, keeps adding log lines as
        # breadcrumbs, also between these blocks: start without them.
        scope.clear_breadcrumbs()
        sentry_sdk.init(**settings)
        try:
            yield events
            sentry_sdk.flush()
        finally:
            sentry_sdk.get_client().close()  # later tests see a client that sends nothing


def load_user(user_id: int) -> None:
    raise KeyError(f"user-{user_id}")


def handle(user_id: int) -> None:
    try:
        load_user(user_id)
    except KeyError as error:
        raise LookupError(f"no user {user_id} in cache 'main'") from error


def sdk_exception(user_id: int = 41, **options) -> dict:
    with sentry(**options) as events:
        try:
            handle(user_id)
        except LookupError as error:
            sentry_sdk.capture_exception(error)
    return events[0]


# What @sentry/browser 8 sends for an uncaught error: frames oldest call first,
# `in_app` set by the SDK, breadcrumbs as a bare list with epoch-second timestamps,
# the visitor's address left to the server (`{{auto}}`).
BROWSER_EVENT = {
    "event_id": "6f1f7a8e2c1b4f0e9d3c2b1a0f9e8d7c",
    "timestamp": 1776748354.123,
    "platform": "javascript",
    "level": "error",
    "environment": "production",
    "release": "web@2.3.1",
    "sdk": {"name": "sentry.javascript.browser", "version": "8.55.0"},
    "exception": {
        "values": [
            {
                "type": "TypeError",
                "value": "Cannot read properties of undefined (reading 'id')",
                "mechanism": {"type": "onerror", "handled": False},
                "stacktrace": {
                    "frames": [
                        {
                            "filename": "https://app.example.com/static/js/main.3f9a2c1b.js?v=7",
                            "function": "HTMLButtonElement.onClick",
                            "lineno": 1,
                            "colno": 5123,
                            "in_app": True,
                        },
                        {
                            "filename": "https://app.example.com/static/js/main.3f9a2c1b.js?v=7",
                            "function": "renderUser",
                            "lineno": 1,
                            "colno": 2210,
                            "in_app": True,
                        },
                        {
                            "filename": "https://app.example.com/node_modules/lodash/get.js",
                            "function": "baseGet",
                            "lineno": 12,
                            "colno": 9,
                            "in_app": False,
                        },
                    ]
                },
            }
        ]
    },
    "breadcrumbs": [
        {"timestamp": 1776748350.5, "category": "navigation", "data": {"to": "/users/42"}},
        {"timestamp": 1776748354.0, "category": "ui.click", "message": "button#save"},
    ],
    "request": {
        "url": "https://app.example.com/users/42?token=abc#tab",
        "headers": {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0"},
    },
    "user": {"ip_address": "{{auto}}"},
    "tags": {"route": "/users/:id"},
}

# What @sentry/node 8 sends from a service: modules named by the SDK, library frames
# not in app, the request as the HTTP integration saw it.
NODE_EVENT = {
    "event_id": "0b7a9c4e-3d2f-4e1a-9b8c-7d6e5f4a3b2c",
    "timestamp": "2026-04-21T05:12:34.567Z",
    "platform": "node",
    "level": "fatal",
    "server_name": "worker-1",
    "transaction": "POST /webhooks/github",
    "exception": {
        "values": [
            {
                "type": "Error",
                "value": "Job 550e8400-e29b-41d4-a716-446655440000 not found",
                "stacktrace": {
                    "frames": [
                        {
                            "filename": "/srv/app/node_modules/fastify/lib/route.js",
                            "module": "fastify.lib:route",
                            "function": "preHandlerCallback",
                            "lineno": 568,
                            "colno": 7,
                            "in_app": False,
                        },
                        {
                            "filename": "/srv/app/dist/usecases/handlePullRequest.js",
                            "module": "dist.usecases:handlePullRequest",
                            "function": "handlePullRequest",
                            "lineno": 88,
                            "colno": 13,
                            "in_app": True,
                            "context_line": "    throw new Error(`Job ${id} not found`);",
                        },
                    ]
                },
            }
        ]
    },
    "request": {
        "method": "POST",
        "url": "http://service.internal/webhooks/github",
        "headers": [["Authorization", "Bearer abcdefghijklmnop"], ["User-Agent", "GitHub"]],
        "cookies": {"session": "s3cr3t"},
    },
    "contexts": {"runtime": {"name": "node", "version": "v22.12.0"}},
    "tags": [["run_id", "42"], ["pr_number", 123]],
}

# GitTinkerer's lib/sentry.sh posts this to /api/<project_id>/store (seed 001).
SEED_001_PAYLOAD = {
    "message": "Deploy failed",
    "level": "error",
    "timestamp": 1672743986,
    "tags": {
        "stage": "production",
        "run_id": "<PAYLOAD_RUN_ID>",
        "repo": "owner/repo",
        "pr_number": "123",
        "source": "workflow|webhook",
    },
    "user": {"id": "<PAYLOAD_WEB_CONVERSATION_ID>", "username": "<USER>"},
    "extra": {"payload_source": "github", "stage": "production"},
}


def stored_safely(event: dict) -> None:
    """What PostgreSQL's JSONB takes: orjson refuses lone surrogates, and no NUL."""
    text = orjson.dumps(event).decode()
    assert "\\u0000" not in text


# --- The real Python SDK ----------------------------------------------------------


def test_it_keeps_a_chained_exception_oldest_to_newest_with_its_frames():
    event = normalized(sdk_exception(41))

    values = event["exception"]["values"]
    assert [v["type"] for v in values] == ["KeyError", "LookupError"]
    assert values[1]["value"] == "no user 41 in cache 'main'"
    frames = values[1]["stacktrace"]["frames"]
    assert [f["function"] for f in frames] == ["sdk_exception", "handle"]  # crash last
    assert frames[-1]["in_app"] is True
    assert frames[-1]["module"] == "tests.test_sentry_events"
    assert isinstance(frames[-1]["lineno"], int)
    assert "raise LookupError" in frames[-1]["context_line"]
    assert event["platform"] == "python"
    assert len(event["event_id"]) == 32
    assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    assert "_truncated" not in event


def test_its_occurrence_reads_the_newest_exception():
    event = normalized(sdk_exception(41, release="agent@1.4.0", environment="staging"))
    occ = occurrence(event, received_at=NOW, request_id="req-1", run_id=None)

    assert occ.source == ErrorReport.Source.SENTRY
    assert occ.level == "error"
    assert occ.error == "LookupError: no user 41 in cache 'main'"
    assert occ.message == "no user 41 in cache 'main'"
    assert occ.title == "LookupError: no user 41 in cache 'main'"
    assert occ.culprit == "tests.test_sentry_events in handle"
    assert occ.release == "agent@1.4.0"
    assert occ.environment == "staging"
    assert occ.event_id == event["event_id"]
    assert occ.event is event
    assert occ.received_at == NOW and occ.request_id == "req-1"
    lines = occ.stack.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith('  File "') and lines[1].endswith(", in sdk_exception")
    assert 'test_sentry_events.py", line ' in lines[1]
    assert lines[-3].endswith(", in handle")
    assert lines[-2].strip().startswith("raise LookupError")
    assert lines[-1] == "LookupError: no user 41 in cache 'main'"


def test_it_keeps_a_logged_message_with_its_template_and_params():
    with sentry(integrations=[LoggingIntegration(event_level=logging.ERROR)]) as events:
        logging.getLogger("tests.billing").error("invoice %s failed after %d tries", "INV-7", 3)
    event = normalized(events[0])

    assert event["logentry"] == {
        "message": "invoice %s failed after %d tries",
        "params": ["INV-7", 3],
        "formatted": "invoice INV-7 failed after 3 tries",
    }
    assert event["message"] == "invoice INV-7 failed after 3 tries"
    assert event["logger"] == "tests.billing"
    occ = occurrence(event, received_at=NOW)
    assert occ.message == "invoice INV-7 failed after 3 tries"
    assert occ.error == "" and occ.stack == ""
    assert occ.context["logger"] == "tests.billing"


def test_a_captured_message_becomes_a_logentry_and_keeps_its_level():
    with sentry() as events:
        sentry_sdk.capture_message("cache warmed in 312 ms", level="warning")
    event = normalized(events[0])

    assert event["logentry"] == {
        "message": "cache warmed in 312 ms",
        "params": None,
        "formatted": "cache warmed in 312 ms",
    }
    assert event["level"] == "warning"
    assert occurrence(event, received_at=NOW).level == "warn"


def test_it_keeps_breadcrumbs_user_tags_release_and_environment():
    with sentry(release="agent@1.4.0", environment="staging") as events:
        sentry_sdk.set_user({"id": 7, "email": "ada@example.com"})
        sentry_sdk.set_tag("run_id", "42")
        sentry_sdk.set_tag("attempt", 2)
        sentry_sdk.add_breadcrumb(category="auth", message="login as ada", level="info")
        sentry_sdk.add_breadcrumb(category="http", data={"url": "/api/x", "status_code": 500})
        sentry_sdk.capture_message("payment declined")
    event = normalized(events[0])

    assert event["tags"] == {"run_id": "42", "attempt": "2"}
    assert event["user"] == {"id": 7, "email": "ada@example.com"}
    assert event["release"] == "agent@1.4.0" and event["environment"] == "staging"
    crumbs = event["breadcrumbs"]["values"]
    assert [c["category"] for c in crumbs] == ["auth", "http"]
    assert crumbs[1]["data"] == {"url": "/api/x", "status_code": 500}
    occ = occurrence(event, received_at=NOW, run_id=None)
    assert occ.context == {
        "platform": "python",
        "logger": "",
        "transaction": "",
        "sdk": "sentry.python 2.75.0",
        "tags": {"run_id": "42", "attempt": "2"},
        "user": {"id": 7, "email": "ada@example.com"},
        "url": "",
    }
    assert occ.visitor and len(occ.visitor) == 16
    other_user = copy.deepcopy(event)
    other_user["user"]["id"] = 8
    assert occurrence(other_user, received_at=NOW).visitor != occ.visitor


def test_it_keeps_the_newest_100_breadcrumbs_and_says_so():
    with sentry(max_breadcrumbs=150) as events:
        for i in range(150):
            sentry_sdk.add_breadcrumb(message=f"step {i}")
        sentry_sdk.capture_message("too many steps")
    event = normalized(events[0])

    crumbs = event["breadcrumbs"]["values"]
    assert len(crumbs) == 100
    assert crumbs[0]["message"] == "step 50" and crumbs[-1]["message"] == "step 149"
    assert event["_truncated"] is True


def test_it_keeps_50_frames_at_each_end_of_a_deep_stack():
    def dive(n: int) -> None:
        if n == 0:
            raise RecursionError("too deep")
        dive(n - 1)

    with sentry() as events:
        try:
            dive(300)
        except RecursionError as error:
            sentry_sdk.capture_exception(error)
    sent = events[0]["exception"]["values"][-1]["stacktrace"]["frames"]
    event = normalized(events[0])

    stacktrace = event["exception"]["values"][-1]["stacktrace"]
    assert len(stacktrace["frames"]) == 100
    assert stacktrace["frames_omitted"] == [50, len(sent) - 50]
    assert stacktrace["frames"][0]["function"] == sent[0]["function"]
    assert stacktrace["frames"][-1]["lineno"] == sent[-1]["lineno"]
    assert event["_truncated"] is True
    stack = occurrence(event, received_at=NOW).stack
    assert f"  … {len(sent) - 100} frames omitted …" in stack.splitlines()


def test_secrets_in_an_sdk_event_are_redacted():
    # Built at run time: the frames' source lines (context_line) are sent too.
    secret = "".join(("hun", "ter", "2"))
    with sentry() as events:
        sentry_sdk.set_extra("api_key", f"k-{secret}")
        sentry_sdk.set_context("deploy", {"token": f"t-{secret}", "target": "prod"})

        def connect(password: str) -> None:
            raise ConnectionError(f"login failed for https://bot:{password}@git.example.com/x")

        try:
            connect(secret)
        except ConnectionError as error:
            sentry_sdk.capture_exception(error)
    event = normalized(events[0])

    assert secret in json.dumps(events[0])
    assert secret not in json.dumps(event)
    assert event["extra"]["api_key"] == "[redacted]"
    assert event["contexts"]["deploy"] == {"token": "[redacted]", "target": "prod"}
    frame = event["exception"]["values"][-1]["stacktrace"]["frames"][-1]
    assert frame["vars"]["password"] == "[redacted]"


# --- Browser, Node and bash -------------------------------------------------------


def test_a_browser_event_is_made_canonical():
    event = normalized(BROWSER_EVENT)

    assert event["timestamp"] == "2026-04-21T05:12:34.123000+00:00"
    crumbs = event["breadcrumbs"]["values"]  # a bare list became {"values": [...]}
    assert [c["timestamp"] for c in crumbs] == [
        "2026-04-21T05:12:30.500000+00:00",
        "2026-04-21T05:12:34+00:00",
    ]
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames[1] == BROWSER_EVENT["exception"]["values"][0]["stacktrace"]["frames"][1]
    occ = occurrence(event, received_at=NOW, client_address="203.0.113.9")
    assert occ.url == "https://app.example.com/users/42"  # no query: it holds tokens
    assert occ.context["url"] == "https://app.example.com/users/42"
    assert occ.context["sdk"] == "sentry.javascript.browser 8.55.0"
    assert occ.culprit == "/static/js/main.3f9a2c1b.js in renderUser"
    assert occ.visitor  # from the address the browser reported from
    assert occ.visitor != occurrence(event, received_at=NOW, client_address="203.0.113.10").visitor
    assert 'File "https://app.example.com/static/js/main.3f9a2c1b.js?v=7", line 1,' in occ.stack


def test_a_node_event_is_made_canonical():
    event = normalized(NODE_EVENT)

    assert event["event_id"] == "0b7a9c4e3d2f4e1a9b8c7d6e5f4a3b2c"
    assert event["timestamp"] == "2026-04-21T05:12:34.567000+00:00"
    assert event["tags"] == {"run_id": "42", "pr_number": "123"}  # from a list of pairs
    assert event["request"]["headers"] == {
        "Authorization": "[redacted]",
        "User-Agent": "GitHub",
    }
    assert event["request"]["cookies"] == "[redacted]"
    occ = occurrence(event, received_at=NOW)
    assert occ.level == "error"  # fatal
    assert occ.culprit == "dist.usecases:handlePullRequest in handlePullRequest"
    assert occ.visitor == ""  # nothing tells this caller apart from another
    assert occ.url == "http://service.internal/webhooks/github"
    assert occ.context["transaction"] == "POST /webhooks/github"


@pytest.mark.django_db
def test_the_seed_001_bash_payload_is_stored_and_grouped(project):
    event = normalized(SEED_001_PAYLOAD)

    assert event["timestamp"] == "2023-01-03T11:06:26+00:00"
    assert event["message"] == "Deploy failed"
    assert event["tags"]["run_id"] == "<PAYLOAD_RUN_ID>"
    assert event["event_id"] == ""  # none sent: the receiver names it
    received = datetime.fromisoformat(event["timestamp"])
    store(project, [occurrence(event, received_at=received, request_id="r1")])
    store(project, [occurrence(normalized(SEED_001_PAYLOAD), received_at=NOW)])

    group = ErrorGroup.objects.get(project=project)
    assert (group.source, group.title, group.culprit, group.count) == (
        "sentry",
        "Deploy failed",
        "",
        2,
    )
    report = group.reports.earliest("received_at")
    assert report.received_at == received
    assert report.level == "error" and report.message == "Deploy failed"
    assert report.event["extra"] == {"payload_source": "github", "stage": "production"}
    assert report.context["user"] == {
        "id": "<PAYLOAD_WEB_CONVERSATION_ID>",
        "username": "<USER>",
    }


# --- Fields one by one ------------------------------------------------------------


@pytest.mark.parametrize(
    "sent, stored",
    [
        ("2026-04-21T05:12:34.123456Z", "2026-04-21T05:12:34.123456+00:00"),
        ("2026-04-21T07:12:34+02:00", "2026-04-21T05:12:34+00:00"),
        ("2026-04-21T05:12:34", "2026-04-21T05:12:34+00:00"),  # naive: UTC, as Sentry
        (1776748354, "2026-04-21T05:12:34+00:00"),
        (1776748354.5, "2026-04-21T05:12:34.500000+00:00"),
        ("1776748354", "2026-04-21T05:12:34+00:00"),
        (None, None),
        ("yesterday", None),
        (True, None),
        (1e20, None),
        (float("nan"), None),
        ("9" * 5000, None),
        ([1776748354], None),
    ],
)
def test_timestamps_become_iso_8601_or_none(sent, stored):
    assert iso_timestamp(sent) == stored
    assert normalized({"timestamp": sent})["timestamp"] == stored


@pytest.mark.parametrize(
    "template, params, formatted",
    [
        ("user %s failed %d times", ["bob", 3], "user bob failed 3 times"),
        ("took %.2f s (%i%%)", [1.5, 40], "took 1.50 s (40%)"),
        ("%(user)s left", {"user": "ada"}, "ada left"),
        ("node %o and %j", [{"a": 1}, [1]], "node {'a': 1} and [1]"),
        ("user {} in {}", ["bob", "eu"], "user bob in eu"),
        ("user {0} in {region!r}", {"region": "eu"}, "user {0} in 'eu'"),
        ("{0:>5}|{1:.1f}|{{literal}}", ["ab", 2.25], "   ab|2.2|{literal}"),
        ("%s and %s", ["only one"], "only one and %s"),  # a missing parameter stays
        ("%d items", ["many"], "many items"),  # a wrong type: the value as text
        ("%999999999d", [1], "%999999999d"),  # a gigabyte of padding: left alone
        ("{:>999999999}", [1], "1"),
        ("{0.__class__}", ["x"], "{0.__class__}"),  # no attribute lookups
        ("no placeholders", ["x"], "no placeholders"),
        ("%s", "not a list", "%s"),
        ("%s" * 5000, ["x" * 30_000], None),  # bounded, see below
    ],
)
def test_message_templates_are_formatted_without_ever_raising(template, params, formatted):
    text = format_message(template, params)
    if formatted is None:
        assert len(text) <= 8_192
    else:
        assert text == formatted


@pytest.mark.parametrize(
    "message, logentry",
    [
        ("plain", {"message": "plain", "params": None, "formatted": "plain"}),
        (
            {"message": "a %s", "params": ["b"]},
            {"message": "a %s", "params": ["b"], "formatted": "a b"},
        ),
        (42, {"message": "42", "params": None, "formatted": "42"}),
        (["not", "a", "message"], None),
    ],
)
def test_a_message_alone_becomes_a_logentry(message, logentry):
    event = normalized({"message": message})
    assert event.get("logentry") == logentry
    assert event.get("message") == (logentry["formatted"] if logentry else None)


def test_a_bare_exception_list_and_an_unwrapped_exception_are_made_values():
    exc = {"type": "ValueError", "value": "bad"}
    assert normalized({"exception": [exc]})["exception"] == {"values": [exc]}
    assert normalized({"exception": exc})["exception"] == {"values": [exc]}


def test_text_fields_are_bounded():
    event = normalized(
        {
            "message": "m" * 20_000,
            "tags": {"k" * 40: "v", "key": "v" * 300},
            "exception": {"values": [{"type": "E", "value": "x" * 20_000}]},
        }
    )
    assert len(event["message"]) == 8_192 and event["message"].endswith("…")
    assert len(event["exception"]["values"][0]["value"]) == 8_192
    assert {len(k) for k in event["tags"]} == {32, 3}
    assert len(event["tags"]["key"]) == 200
    assert event["_truncated"] is True


def test_nul_and_lone_surrogates_are_cleaned():
    event = normalized(
        {
            "message": "a\x00b\ud800c",
            "tags": {"k\ud800": "v\x00"},
            "extra": {"deep\x00": ["\udfff"]},
        }
    )
    stored_safely(event)
    assert event["message"] == "ab\ufffdc"
    assert event["tags"] == {"k\ufffd": "v"}


# --- Hostile shapes ---------------------------------------------------------------

ODD = [
    None,
    True,
    0,
    -1,
    2**70,
    1.5e308,
    float("nan"),
    "",
    "12",
    "true",
    "x" * 40_000,
    "\x00",
    "\ud800",
    "{{ default }}",
    "%s%s%s%999d",
    [],
    [None],
    [[1, 2, 3]],
    ["a", "b"],
    {},
    {"values": 1},
    {"values": [1, "x", None]},
    {"frames": {"0": {}}},
]


def deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def paths(value, prefix=()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            yield from paths(item, (*prefix, i))


def replaced(value, path: tuple, new):
    if not path:
        return new
    value = copy.copy(value)
    value[path[0]] = replaced(value[path[0]], path[1:], new)
    return value


def check(payload) -> None:
    event = normalized(payload)
    stored_safely(event)
    assert isinstance(event["tags"], dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in event["tags"].items())
    occ = occurrence(event, received_at=NOW, client_address="198.51.100.1")
    assert isinstance(occ.fingerprint, str) and len(occ.title) <= 255
    assert len(occ.message) <= 8_192 and len(occ.error) <= 8_192
    assert len(occ.event_id) <= 32 and len(occ.release) <= 200 and len(occ.environment) <= 64
    assert occ.level in {"debug", "info", "warn", "error"}
    orjson.dumps(occ.context)


@pytest.mark.parametrize("base", [BROWSER_EVENT, NODE_EVENT, SEED_001_PAYLOAD])
def test_no_odd_value_anywhere_makes_it_raise(base):
    # Every place of a real event gets every odd value, and random pairs of places.
    places = list(paths(base))
    for path in places:
        for odd in ODD:
            check(replaced(base, path, odd))
    rng = random.Random(12)
    for _ in range(300):
        payload = base
        for path in rng.sample(places, 2):
            # The first change may have removed the second's place.
            with contextlib.suppress(KeyError, IndexError, TypeError):
                payload = replaced(payload, path, rng.choice(ODD))
        check(payload)


def test_an_sdk_event_with_odd_values_never_raises():
    base = sdk_exception(7)
    for path in paths(base):
        for odd in (None, [], {}, "12", 2**70, "\ud800"):
            check(replaced(base, path, odd))


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "event",
        {"exception": deep(5_000), "extra": {"a": deep(5_000)}},
        {"message": {"message": "%s", "params": deep(5_000)}},
        {"breadcrumbs": {"values": [{}] * 10_000}},
        {"exception": {"values": [{"type": "E", "stacktrace": {"frames": [{}] * 5_000}}]}},
        {"exception": {"values": [{"type": f"E{i}"} for i in range(1_000)]}},
        {"tags": [[str(i), i] for i in range(2_000)]},
        {"tags": [["a"], ["a", "b", "c"], "ab", {"a": "b"}, [None, "x"], ["k", None]]},
        {"user": ["id", 1], "request": "GET /", "contexts": [], "extra": 3, "sdk": "x"},
        {"request": {"headers": [["a"], [1, "b"], "c"], "cookies": "a=b"}},
        {"fingerprint": [1, None, {"a": 1}, "{{default}}", "x" * 500]},
        {"level": ["error"], "release": 1.5, "environment": 2**70},
        {"event_id": "Z" * 32, "timestamp": {"$date": 1}},
        {"exception": {"values": [{"type": "E", "stacktrace": {"frames_omitted": "x"}}]}},
        {str(i): i for i in range(2_000)} | {"message": "kept"},
        {1: "numeric key", "_truncated": False, "message": "m"},
    ],
)
def test_hostile_shapes_are_dropped_or_coerced(payload):
    check(payload)


def test_what_it_cannot_use_it_drops_and_what_it_can_it_coerces():
    event = normalized(
        {
            "user": ["id", 1],
            "level": 3,
            "release": 1.5,
            "exception": {
                "values": [
                    "not an exception",
                    {
                        "type": "E",
                        "stacktrace": {
                            "frames": [
                                {"lineno": "12", "colno": "²", "in_app": "true", "vars": []},
                                [],
                            ]
                        },
                    },
                ]
            },
        }
    )
    assert "user" not in event
    assert event["level"] == "3" and event["release"] == "1.5"
    assert event["exception"]["values"] == [
        {"type": "E", "stacktrace": {"frames": [{"lineno": 12, "in_app": True}]}}
    ]
    assert occurrence(event, received_at=NOW).level == "error"  # an unknown level


def test_many_unknown_fields_do_not_push_the_known_ones_out():
    payload = {str(i): i for i in range(2_000)} | {"message": "kept"}
    event = normalized(payload)
    assert event["message"] == "kept"
    assert event["_truncated"] is True
