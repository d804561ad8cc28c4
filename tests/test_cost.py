"""Cost of llm.call events: priced at the call's time unless the client sent a cost."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from runs.models import Event, ModelPrice, Run
from tests.conftest import ndjson, record


@pytest.fixture
def prices(db):
    ModelPrice.objects.all().delete()  # the starter list must not decide these tests
    ModelPrice.objects.create(
        model="acme-1",
        input_per_mtok=Decimal("2"),
        output_per_mtok=Decimal("10"),
        valid_from=datetime(2026, 1, 1, tzinfo=UTC),
    )
    ModelPrice.objects.create(
        model="acme-1",
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("5"),
        valid_from=datetime(2026, 6, 1, tzinfo=UTC),
    )
    ModelPrice.objects.create(
        model="acme-*",
        input_per_mtok=Decimal("100"),
        output_per_mtok=Decimal("100"),
        valid_from=datetime(2026, 1, 1, tzinfo=UTC),
    )


def call(ts: str, **data) -> dict:
    return record("llm.call", ts=ts, run_id="r1", data=data)


def test_it_prices_a_call_at_the_price_valid_when_it_happened(post_events, prices):
    post_events(
        ndjson(
            call("2026-03-01T00:00:00Z", model="acme-1", tokens_in=1_000_000, tokens_out=100_000),
            call("2026-07-01T00:00:00Z", model="acme-1", tokens_in=1_000_000, tokens_out=100_000),
        )
    )
    run = Run.objects.get(run_id="r1")
    # 2 + 1 = 3 for input, 1 + 0.5 = 1.5 for output.
    assert run.cost_usd == Decimal("4.5")
    costs = [e.cost_usd for e in Event.objects.filter(run=run).order_by("seq")]
    assert costs == [Decimal("3"), Decimal("1.5")]


def test_a_computed_cost_stays_out_of_the_agents_data(post_events, prices, client, token):
    sent = call(
        "2026-07-01T00:00:00Z", model="acme-1", tokens_in=812, tokens_out=96, latency_ms=1234
    )
    post_events(ndjson(sent))
    event = Event.objects.get(run__run_id="r1")
    assert event.data == sent["data"]
    assert event.cost_usd == Decimal("0.001292")  # 812 at $1 + 96 at $5 per million

    exported = client.get("/api/runs/r1/events?format=jsonl", HTTP_AUTHORIZATION=f"Bearer {token}")
    (line,) = b"".join(exported.streaming_content).decode().splitlines()
    assert json.loads(line) == {
        k: sent[k] for k in ("ts", "slug", "phase", "level", "event", "data")
    } | {"ts": "2026-07-01T00:00:00.000+00:00"}
    listed = client.get("/api/runs/r1/events", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert listed["items"][0]["cost_usd"] == 0.001292
    assert listed["items"][0]["data"] == sent["data"]


def test_it_takes_the_exact_name_over_a_pattern_and_a_pattern_for_others(post_events, prices):
    post_events(
        ndjson(
            call("2026-07-01T00:00:00Z", model="acme-2", tokens_in=10_000),
            call("2026-07-01T00:00:00Z", model="acme-1", tokens_in=10_000),
        )
    )
    assert Run.objects.get(run_id="r1").cost_usd == Decimal("1.01")


def test_a_cost_sent_by_the_client_wins(post_events, prices):
    post_events(
        ndjson(call("2026-07-01T00:00:00Z", model="acme-1", tokens_in=10**6, cost_usd=0.25))
    )
    run = Run.objects.get(run_id="r1")
    assert run.cost_usd == Decimal("0.25")
    event = Event.objects.get(run=run)
    assert event.data["cost_usd"] == 0.25 and event.cost_usd is None


def test_unknown_models_and_calls_before_any_price_cost_nothing(post_events, prices):
    post_events(
        ndjson(
            call("2026-07-01T00:00:00Z", model="other", tokens_in=10**6),
            call("2025-07-01T00:00:00Z", model="acme-1", tokens_in=10**6),
        )
    )
    run = Run.objects.get(run_id="r1")
    assert run.cost_usd == 0
    assert run.tokens_in == 2 * 10**6


def test_the_starter_price_list_prices_common_models(post_events):
    post_events(ndjson(call("2026-07-01T00:00:00Z", model="gpt-4o-mini-2024", tokens_in=10**6)))
    assert Run.objects.get(run_id="r1").cost_usd == Decimal("0.15")
