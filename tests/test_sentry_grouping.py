"""Which group a Sentry event joins (docs/errors.md, "Sentry grouping"): events made by
the real `sentry-sdk`, and browser, Node and bash events as those clients send them."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration

from telemetry.errors import normalize_message, store
from telemetry.models import ErrorGroup
from telemetry.sentry.events import normalized, occurrence
from telemetry.sentry.grouping import group
from tests.test_sentry_events import (
    BROWSER_EVENT,
    NODE_EVENT,
    NOW,
    SEED_001_PAYLOAD,
    sdk_exception,
    sentry,
)


def parts(event: dict) -> list[str]:
    return json.loads(group(normalized(event)).key)


def key(event: dict) -> str:
    return group(normalized(event)).key


def captured(function, *args, fingerprint: list[str] | None = None) -> dict:
    """The event the real SDK sends for what `function(*args)` raises."""
    with sentry() as events:
        try:
            function(*args)
        except Exception as error:
            sentry_sdk.capture_exception(error, fingerprint=fingerprint)
    return events[0]


def logged(template: str, *args) -> dict:
    with sentry(integrations=[LoggingIntegration(event_level=logging.ERROR)]) as events:
        logging.getLogger("tests.billing").error(template, *args)
    return events[0]


def message(text: str) -> dict:
    with sentry() as events:
        sentry_sdk.capture_message(text)
    return events[0]


def save_order(order_id: str) -> None:
    raise ValueError(f"order {order_id} has no lines (user 0x7ffe12ab, '{order_id}')")


def cancel_order(order_id: str) -> None:
    raise ValueError(f"order {order_id} has no lines (user 0x7ffe12ab, '{order_id}')")


def save_order_typed(order_id: str) -> None:
    raise TypeError(f"order {order_id} has no lines (user 0x7ffe12ab, '{order_id}')")


def read_config(text: str) -> dict:
    return json.loads(text)


def charge(cause: type[Exception]) -> None:
    try:
        raise cause("card 4242 declined")
    except Exception as error:
        raise RuntimeError("payment 1234 failed") from error


# --- Exceptions -------------------------------------------------------------------


def test_an_exception_groups_by_type_masked_value_and_top_in_app_frame():
    event = normalized(sdk_exception(41))
    grouping = group(event)

    assert json.loads(grouping.key) == [
        "exception",
        "LookupError",
        "no user <n> in cache <str>",
        "tests.test_sentry_events",
        "handle",
    ]
    assert grouping.title == "LookupError: no user 41 in cache 'main'"  # not masked
    assert grouping.culprit == "tests.test_sentry_events in handle"


def test_events_differing_only_in_ids_numbers_and_quoted_values_are_one_group():
    uuid_a, uuid_b = "550e8400-e29b-41d4-a716-446655440000", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    assert key(captured(save_order, uuid_a)) == key(captured(save_order, uuid_b))
    assert key(captured(save_order, "17")) == key(captured(save_order, "90210"))
    assert key(sdk_exception(41)) == key(sdk_exception(9_000))
    assert parts(captured(save_order, uuid_a))[2] == "order <uuid> has no lines (user <hex>, <str>)"


def test_other_types_and_other_functions_are_other_groups():
    assert key(captured(save_order, "17")) != key(captured(save_order_typed, "17"))
    assert key(captured(save_order, "17")) != key(captured(cancel_order, "17"))


def test_the_value_is_masked_by_the_masking_beacon_reports_use():
    event = normalized(captured(save_order, "a1b2c3d4e5"))
    value = event["exception"]["values"][-1]["value"]
    assert parts(event)[2] == normalize_message(value)


def test_in_a_chain_the_newest_exception_decides():
    # `raise RuntimeError(...) from KeyError(...)`: Sentry sends [KeyError, RuntimeError].
    by_key_error, by_index_error = captured(charge, KeyError), captured(charge, IndexError)
    assert [v["type"] for v in normalized(by_key_error)["exception"]["values"]] == [
        "KeyError",
        "RuntimeError",
    ]
    assert key(by_key_error) == key(by_index_error)
    assert parts(by_key_error)[:3] == ["exception", "RuntimeError", "payment <n> failed"]
    assert group(normalized(by_key_error)).title == "RuntimeError: payment 1234 failed"


def test_the_top_frame_is_the_last_in_app_one_not_the_librarys():
    event = normalized(captured(read_config, "{bad"))
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames[-1]["module"] == "json.decoder" and "in_app" not in frames[-1]

    assert parts(event)[3:] == ["tests.test_sentry_grouping", "read_config"]
    assert group(event).culprit == "tests.test_sentry_grouping in read_config"
    assert group(event).title.startswith("JSONDecodeError: Expecting property name")


def test_without_an_in_app_frame_the_crashing_frame_counts():
    event = copy.deepcopy(BROWSER_EVENT)
    for frame in event["exception"]["values"][0]["stacktrace"]["frames"]:
        frame["in_app"] = False
    assert parts(event)[3:] == ["/node_modules/lodash/get.js", "baseGet"]
    assert group(normalized(event)).culprit == "/node_modules/lodash/get.js in baseGet"


def test_an_exception_without_frames_groups_by_type_and_value():
    event = {"exception": {"values": [{"type": "ZeroDivisionError", "value": "division by 0"}]}}
    grouping = group(normalized(event | {"transaction": "/checkout"}))
    assert json.loads(grouping.key) == ["exception", "ZeroDivisionError", "division by <n>"]
    assert (grouping.title, grouping.culprit) == ("ZeroDivisionError: division by 0", "/checkout")


def test_a_browser_error_in_another_build_is_the_same_group():
    grouping = group(normalized(BROWSER_EVENT))
    assert json.loads(grouping.key) == [
        "exception",
        "TypeError",
        "Cannot read properties of undefined (reading <str>)",
        "/static/js/main.<hex>.js",
        "renderUser",
    ]
    assert grouping.title == "TypeError: Cannot read properties of undefined (reading 'id')"
    assert grouping.culprit == "/static/js/main.3f9a2c1b.js in renderUser"

    next_build = json.loads(
        json.dumps(BROWSER_EVENT)
        .replace("3f9a2c1b", "77e0d1aa")
        .replace("v=7", "v=8")
        .replace("2210", "2388")
        .replace("reading 'id'", "reading 'name'")
    )
    assert key(next_build) == key(BROWSER_EVENT)
    elsewhere = json.loads(json.dumps(BROWSER_EVENT).replace("renderUser", "renderTeam"))
    assert key(elsewhere) != key(BROWSER_EVENT)


def test_a_node_error_groups_by_module_and_masks_uuids():
    grouping = group(normalized(NODE_EVENT))
    assert json.loads(grouping.key) == [
        "exception",
        "Error",
        "Job <uuid> not found",
        "dist.usecases:handlePullRequest",
        "handlePullRequest",
    ]
    assert grouping.culprit == "dist.usecases:handlePullRequest in handlePullRequest"
    other_job = json.loads(
        json.dumps(NODE_EVENT).replace("550e8400-e29b-41d4-a716-446655440000", "1" * 32)
    )
    assert key(other_job) == key(NODE_EVENT)


# --- Messages ---------------------------------------------------------------------


def test_a_logged_message_groups_by_its_template():
    a = logged("invoice %s failed after %d tries", "INV-7", 3)
    b = logged("invoice %s failed after %d tries", "INV-1022", 5)
    assert parts(a) == ["message", "invoice %s failed after %d tries"]
    assert key(a) == key(b)
    assert key(a) != key(logged("invoice %s was refunded", "INV-7"))
    grouping = group(normalized(a))
    assert (grouping.title, grouping.culprit) == ("invoice INV-7 failed after 3 tries", "")


def test_a_message_without_params_groups_by_its_masked_text():
    a = message("sync of repo 'acme/api' took 412 ms (job 9f86d081884c7d65)")
    assert parts(a) == ["message", "sync of repo <str> took <n> ms (job <hex>)"]
    assert key(a) == key(message("sync of repo 'acme/web' took 90 ms (job 0a1b2c3d4e5f6789)"))
    assert key(message("disk full")) != key(message("disk quota exceeded"))


def test_a_message_title_is_its_first_line():
    grouping = group(normalized({"message": "build 12 failed\nstep 3: npm ci"}))
    assert grouping.title == "build 12 failed"
    assert json.loads(grouping.key) == ["message", "build <n> failed\nstep <n>: npm ci"]


def test_the_seed_001_bash_payload_groups_by_its_message():
    grouping = group(normalized(SEED_001_PAYLOAD))
    assert json.loads(grouping.key) == ["message", "Deploy failed"]
    assert (grouping.title, grouping.culprit) == ("Deploy failed", "")


def test_an_event_with_neither_groups_by_its_transaction():
    grouping = group(normalized({"transaction": "GET /health"}))
    assert json.loads(grouping.key) == ["event", "GET /health"]
    assert (grouping.title, grouping.culprit) == ("", "GET /health")
    assert occurrence(normalized({}), received_at=NOW).title == "(no message)"


# --- Fingerprints -----------------------------------------------------------------


@pytest.mark.parametrize("default", ["{{ default }}", "{{default}}", "{{  default   }}"])
def test_default_in_a_fingerprint_stands_for_the_default_parts(default):
    plain = parts(captured(save_order, "17"))
    tenant_a = captured(save_order, "17", fingerprint=[default, "tenant-a"])

    assert normalized(tenant_a)["fingerprint"] == [default, "tenant-a"]
    assert parts(tenant_a) == [*plain, "tenant-a"]
    assert key(tenant_a) == key(captured(save_order, "90210", fingerprint=[default, "tenant-a"]))
    assert key(tenant_a) != key(captured(save_order, "17", fingerprint=[default, "tenant-b"]))
    assert key(captured(save_order, "17", fingerprint=[default])) == key(captured(save_order, "17"))


def test_a_fingerprint_without_default_groups_by_its_values_alone():
    down = ["database-unavailable"]
    order_error = captured(save_order, "17", fingerprint=down)
    config_error = captured(read_config, "{bad", fingerprint=down)

    assert parts(order_error) == ["database-unavailable"]
    assert key(order_error) == key(config_error)
    # The title and culprit still describe each event.
    assert group(normalized(config_error)).culprit == "tests.test_sentry_grouping in read_config"


def test_an_unusable_fingerprint_is_ignored():
    assert key({"message": "x", "fingerprint": []}) == key({"message": "x"})
    assert key({"message": "x", "fingerprint": [None, {}]}) == key({"message": "x"})
    assert group({"message": "x", "fingerprint": "not normalized"}).key


# --- Stored -----------------------------------------------------------------------


@pytest.mark.django_db
def test_sdk_events_land_in_their_groups(project):
    events = [
        captured(save_order, "17"),
        captured(save_order, "90210"),
        captured(cancel_order, "17"),
        logged("invoice %s failed after %d tries", "INV-7", 3),
        logged("invoice %s failed after %d tries", "INV-8", 4),
    ]
    store(project, [occurrence(normalized(e), received_at=NOW) for e in events])

    groups = ErrorGroup.objects.filter(project=project, source="sentry")
    assert {(g.culprit, g.title, g.count) for g in groups} == {
        (
            "tests.test_sentry_grouping in save_order",
            "ValueError: order 17 has no lines (user 0x7ffe12ab, '17')",
            2,
        ),
        (
            "tests.test_sentry_grouping in cancel_order",
            "ValueError: order 17 has no lines (user 0x7ffe12ab, '17')",
            1,
        ),
        ("", "invoice INV-7 failed after 3 tries", 2),
    }
