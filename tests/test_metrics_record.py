"""POST /api/metrics/record: judged item by item, spooled, stored by the worker."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.test import Client

from runs.models import ModelPrice, PriceBook, Run, RunMetric
from telemetry.models import IngestBatch
from telemetry.receivers.metrics import Metric, computed_costs, store_metrics


@pytest.fixture
def run(project) -> Run:
    return Run.objects.create(project=project, run_id="run-1", slug="octocat__hello-world")


@pytest.fixture
def send(client, token, django_capture_on_commit_callbacks):
    """POST a metrics body (an object, or bytes as they are) and let the eager worker run."""

    def post(
        body,
        *,
        auth: str | None = None,
        content_type: str = "application/json",
        gzip_it: bool = False,
        **headers,
    ):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        extra = {"HTTP_AUTHORIZATION": f"Bearer {token if auth is None else auth}"}
        if gzip_it:
            data = gzip.compress(data)
            extra["HTTP_CONTENT_ENCODING"] = "gzip"
        for name, value in headers.items():
            extra["HTTP_" + name.upper().replace("-", "_")] = value
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/api/metrics/record", data, content_type=content_type, **extra)

    return post


def item(name: str = "duration_ms", value=5432, **fields) -> dict:
    return {"run_id": "run-1", "metric_name": name, "metric_value": value, **fields}


# --- Recording ------------------------------------------------------------------


def test_it_records_one_metric_with_its_standard_unit(send, run):
    response = send(item(recorded_at="2026-01-07T14:32:15Z"))
    assert response.status_code == 202, response.content
    answer = response.json()
    assert answer["accepted"] == 1 and answer["rejected"] == 0 and answer["errors"] == []
    assert IngestBatch.objects.get(pk=answer["batch"]).state == "done"
    metric = RunMetric.objects.get()
    assert (metric.run_id, metric.name, metric.value, metric.unit) == (
        run.pk,
        "duration_ms",
        5432,
        "ms",
    )
    assert metric.recorded_at == datetime(2026, 1, 7, 14, 32, 15, tzinfo=UTC)
    assert metric.source == "api" and metric.labels == {}


def test_it_records_a_flush_metrics_batch(send, run):
    body = {
        "metrics": [
            item("tokens_used", 1250),
            item("files_changed", "3"),  # shell emitters quote numbers
            item("duration_ms", 5432.5, recorded_at=1767796335),
            item("agent.tool_calls", 7, unit="calls", labels={"tool": "bash", "ok": True}),
        ]
    }
    answer = send(body).json()
    assert answer["accepted"] == 4
    stored = {m.name: m for m in RunMetric.objects.all()}
    assert stored["tokens_used"].unit == "tokens"
    assert stored["files_changed"].value == 3 and stored["files_changed"].unit == "files"
    assert stored["duration_ms"].recorded_at == datetime(2026, 1, 7, 14, 32, 15, tzinfo=UTC)
    assert stored["agent.tool_calls"].unit == "calls"
    assert stored["agent.tool_calls"].labels == {"tool": "bash", "ok": "true"}


def test_items_without_a_time_take_the_time_of_the_request(send, run):
    before = datetime.now(UTC)
    answer = send({"metrics": [item(), item("exit_code", 0)]}).json()
    after = datetime.now(UTC)
    batch = IngestBatch.objects.get(pk=answer["batch"])
    times = set(RunMetric.objects.values_list("recorded_at", flat=True))
    assert times == {batch.received_at} and before <= batch.received_at <= after


def test_a_metric_without_run_id_is_a_fleet_metric(send):
    response = send({"metric_name": "queue_depth", "metric_value": 12})
    assert response.status_code == 202
    metric = RunMetric.objects.get()
    assert metric.run_id is None and metric.unit == ""


def test_it_judges_items_one_by_one_and_keeps_the_good_ones(send, run):
    bad = [
        "not an object",
        item(""),  # empty name
        item("x" * 201),
        item(value=None),
        item(value=True),
        item(value="NaN"),
        item(value="1e999"),  # infinity once parsed
        item(value={"n": 1}),
        item(recorded_at="yesterday"),
        item(labels=["a"]),
        item(labels={f"k{i}": "v" for i in range(65)}),
        item(labels={"k": "v" * 201}),
        item(labels={"k": {"nested": 1}}),
        item(unit="u" * 33),
        item(run_id="r" * 129),
        item(run_id="run-1\u0000"),
        item("tokens_in", -5),
        item(run_id="nobody-knows-me"),
    ]
    body = {"metrics": [item(), *bad, item("exit_code", 1)]}
    response = send(body)
    assert response.status_code == 202
    answer = response.json()
    assert answer["accepted"] == 2
    assert answer["rejected"] == len(bad)
    assert [e["index"] for e in answer["errors"]] == list(range(1, len(bad) + 1))
    messages = [e["error"] for e in answer["errors"]]
    expected = [
        "item must be a JSON object",
        "metric_name: required",
        "metric_name: longer than 200",
        "metric_value: required",
        "metric_value: must be a number, not a boolean",
        "metric_value: must be finite",
        "metric_value: must be finite",
        "metric_value: must be a number",
        "recorded_at: not an ISO 8601",
        "labels: must be a JSON object",
        "labels: more than 64 keys",
        "labels.k: longer than 200",
        "labels.k: must be a string, number or boolean",
        "unit: longer than 32",
        "run_id: longer than 128",
        "run_id: must not contain NUL",
        "metric_value: tokens_in must not be negative",
        "run_id: no such run in this project",
    ]
    for message, start in zip(messages, expected, strict=True):
        assert message.startswith(start), (message, start)
    assert sorted(RunMetric.objects.values_list("name", flat=True)) == ["duration_ms", "exit_code"]


def test_a_request_with_no_acceptable_item_is_a_400_with_the_verdicts(send, run):
    response = send({"metrics": [item(value="many"), item(run_id="ghost")]})
    assert response.status_code == 400
    answer = response.json()
    assert answer["accepted"] == 0 and answer["rejected"] == 2 and answer["batch"] is None
    assert [e["index"] for e in answer["errors"]] == [0, 1]
    assert IngestBatch.objects.count() == 0 and RunMetric.objects.count() == 0


def test_a_run_of_another_project_is_unknown_here(send, run, stranger):
    _, their_token = stranger
    response = send(item(), auth=their_token)
    assert response.status_code == 400
    assert response.json()["errors"][0]["error"] == "run_id: no such run in this project"


def test_an_item_refused_for_its_run_stays_refused_when_the_run_appears_later(
    client, token, run, project
):
    from telemetry.ingest.pipeline import process as process_batch

    # The worker is late (no on-commit callback runs here): meanwhile the run that
    # the request did not know is created by its events.
    body = json.dumps({"metrics": [item(), item(run_id="late")]})
    answer = client.post(
        "/api/metrics/record",
        body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    ).json()
    assert answer["accepted"] == 1 and RunMetric.objects.count() == 0
    Run.objects.create(project=project, run_id="late")
    assert process_batch(answer["batch"]) is True
    assert list(RunMetric.objects.values_list("run__run_id", flat=True)) == ["run-1"]


def test_bad_bodies_get_a_clear_400(send, run):
    cases = {
        b"{not json": "body is not valid JSON",
        b"42": "body must be a metric object",
        b'{"metrics": {"a": 1}}': '"metrics" must be a JSON array',
        b'{"metrics": []}': "no metrics in the body",
        b"  ": "empty body",
    }
    for body, detail in cases.items():
        response = send(body)
        assert response.status_code == 400, body
        assert response.json()["detail"].startswith(detail), (body, response.json())
    assert IngestBatch.objects.count() == 0


def test_it_needs_a_valid_token(send, client, run):
    assert send(item(), auth="rl_wrong").status_code == 401
    response = client.post(
        "/api/metrics/record", json.dumps(item()), content_type="application/json"
    )
    assert response.status_code == 401
    assert "token" in response.json()["detail"]


def test_it_refuses_other_content_types(send, run):
    response = send(
        b"metric_name=x&metric_value=1", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]
    response = send(json.dumps(item()).encode(), **{"Content-Encoding": "compress"})
    assert response.status_code == 415


def test_it_accepts_gzip_bodies(send, run):
    response = send({"metrics": [item(), item("exit_code", 0)]}, gzip_it=True)
    assert response.status_code == 202
    assert RunMetric.objects.count() == 2


def test_a_gzip_bomb_is_cut_off_after_decompression(send, run, settings):
    settings.INGEST_MAX_BYTES = 10_000
    bomb = b'{"metrics": [' + b" " * 5_000_000 + b"]}"
    response = send(bomb, gzip_it=True)
    assert response.status_code == 413
    assert "after decompression" in response.json()["detail"]
    assert IngestBatch.objects.count() == 0


def test_the_same_idempotency_key_stores_the_request_once(send, run):
    body = {"metrics": [item(), item("exit_code", 0)]}
    first = send(body, **{"Idempotency-Key": "flush-42"})
    second = send(body, **{"Idempotency-Key": "flush-42"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert RunMetric.objects.count() == 2
    assert IngestBatch.objects.filter(kind="metrics").count() == 1


def test_an_events_request_with_the_same_key_is_another_request(send, run, post_events):
    from tests.conftest import ndjson, record

    post_events(ndjson(record("a.b")), run_id="run-1", **{"Idempotency-Key": "k1"})
    answer = send(item(), **{"Idempotency-Key": "k1"}).json()
    assert answer["accepted"] == 1 and RunMetric.objects.count() == 1


def test_the_worker_stores_a_batch_once(send, run):
    from telemetry.ingest.pipeline import process as process_batch

    batch = send(item()).json()["batch"]
    assert process_batch(batch) is False  # done already
    assert RunMetric.objects.count() == 1


def test_secrets_in_labels_never_reach_the_database(send, run):
    labels = {"api_key": "abc123", "url": "https://bob:hunter2@git.example.com/x"}
    send(item(labels=labels))
    stored = RunMetric.objects.get().labels
    assert stored["api_key"] == "[redacted]"
    assert "hunter2" not in stored["url"]


# --- Cost and run counters --------------------------------------------------------


@pytest.fixture
def prices(db):
    ModelPrice.objects.all().delete()  # the starter list must not decide these tests
    for since, inp, out in (("2026-01-01", "2", "10"), ("2026-06-01", "1", "5")):
        ModelPrice.objects.create(
            model="acme-1",
            input_per_mtok=Decimal(inp),
            output_per_mtok=Decimal(out),
            valid_from=datetime.fromisoformat(since).replace(tzinfo=UTC),
        )


def tokens(direction: str, count: int, at: str, model: str = "acme-1", **fields) -> dict:
    return item(f"tokens_{direction}", count, recorded_at=at, labels={"model": model}, **fields)


def test_token_metrics_are_priced_at_the_price_valid_at_their_time(send, run, prices):
    send(
        {
            "metrics": [
                tokens("in", 1_000_000, "2026-03-01T00:00:00Z"),
                tokens("out", 100_000, "2026-03-01T00:00:00Z"),
                tokens("in", 1_000_000, "2026-07-01T00:00:00Z"),
            ]
        }
    )
    costs = RunMetric.objects.filter(name="cost_usd").order_by("recorded_at")
    # March: 2 + 10 * 0.1 = 3 (one point for the call's in and out); July: 1.
    assert [(c.value, c.unit, c.labels) for c in costs] == [
        (3.0, "USD", {"model": "acme-1", "computed": "true"}),
        (1.0, "USD", {"model": "acme-1", "computed": "true"}),
    ]
    run.refresh_from_db()
    assert (run.tokens_in, run.tokens_out, run.cost_usd) == (2_000_000, 100_000, Decimal(4))


def test_a_cost_sent_by_the_client_wins_for_its_run(send, run, project, prices):
    Run.objects.create(project=project, run_id="run-2")
    send(
        {
            "metrics": [
                tokens("in", 1_000_000, "2026-03-01T00:00:00Z"),
                item("cost_usd", 0.25),
                tokens("in", 1_000_000, "2026-03-01T00:00:00Z", run_id="run-2"),
            ]
        }
    )
    costs = dict(RunMetric.objects.filter(name="cost_usd").values_list("run__run_id", "value"))
    assert costs == {"run-1": 0.25, "run-2": 2.0}
    run.refresh_from_db()
    assert run.cost_usd == Decimal("0.25") and run.tokens_in == 1_000_000


def test_unknown_models_times_before_any_price_and_unlabelled_tokens_cost_nothing(
    send, run, prices
):
    send(
        {
            "metrics": [
                tokens("in", 10**6, "2026-03-01T00:00:00Z", model="other"),
                tokens("in", 10**6, "2025-03-01T00:00:00Z"),
                item("tokens_out", 10**6),
                item("tokens_used", 10**6, labels={"model": "acme-1"}),
            ]
        }
    )
    assert not RunMetric.objects.filter(name="cost_usd").exists()
    run.refresh_from_db()
    assert (run.tokens_in, run.tokens_out, run.cost_usd) == (2 * 10**6, 10**6, 0)


def test_the_starter_price_list_prices_common_models(send, run):
    send(tokens("in", 10**6, "2026-07-01T00:00:00Z", model="gpt-4o-mini-2024"))
    assert RunMetric.objects.get(name="cost_usd").value == pytest.approx(0.15)


def test_counters_add_up_over_batches_and_duration_fills_a_gap_only(send, run, project):
    send({"metrics": [item("tokens_in", 100), item("tokens_out", 10), item("cost_usd", 0.5)]})
    send({"metrics": [item("tokens_in", 1), item("duration_ms", 5000), item("exit_code", 2)]})
    send({"metrics": [item("duration_ms", 9000), item("exit_code", 0)]})
    run.refresh_from_db()
    assert (run.tokens_in, run.tokens_out, run.cost_usd) == (101, 10, Decimal("0.5"))
    assert (run.duration_ms, run.exit_code) == (5000, 2)
    finished = Run.objects.create(project=project, run_id="done", duration_ms=1200)
    send(item("duration_ms", 99, run_id="done"))
    finished.refresh_from_db()
    assert finished.duration_ms == 1200  # the run's own events decided it


def test_computed_costs_group_a_calls_tokens_and_skip_fleet_clients_costs():
    at = datetime(2026, 3, 1, tzinfo=UTC)
    price = ModelPrice(
        model="m", input_per_mtok=Decimal(1), output_per_mtok=Decimal(2), valid_from=at
    )
    book = PriceBook([price])

    def m(name, value, run_id="", model="m"):
        return Metric(name, value, "tokens", {"model": model}, at, run_id)

    costs = computed_costs([m("tokens_in", 10**6), m("tokens_out", 10**6)], book)
    assert [(c.value, c.run_id) for c in costs] == [(3.0, "")]
    assert computed_costs([m("tokens_in", 10**6), m("cost_usd", 1.0)], book) == []


def test_one_batch_writes_its_points_with_one_copy(project, run, django_assert_max_num_queries):
    points = [
        Metric("duration_ms", float(i), "ms", {}, datetime(2026, 1, 1, tzinfo=UTC), "run-1", run.pk)
        for i in range(500)
    ]
    # COPY, then the counters' UPDATE: no query per point.
    with django_assert_max_num_queries(2):
        assert store_metrics(project, points, PriceBook([])) == 500
    assert RunMetric.objects.count() == 500


# --- Admin --------------------------------------------------------------------------


def test_operators_edit_prices_and_read_metrics_in_the_admin(send, run, db):
    from django.contrib.auth.models import User

    send(item(labels={"model": "acme-1"}))
    admin = User.objects.create_superuser("root", password="pw-for-tests-only")
    browser = Client()
    browser.force_login(admin)
    page = browser.get("/admin/runs/modelprice/")
    assert page.status_code == 200 and b"claude-sonnet-4*" in page.content
    price = ModelPrice.objects.filter(model="gpt-4o-mini*").get()
    form = {
        "model": price.model,
        "input_per_mtok": "0.2",
        "output_per_mtok": "0.8",
        "valid_from_0": "2025-01-01",
        "valid_from_1": "00:00:00",
        "note": "new list price",
    }
    saved = browser.post(f"/admin/runs/modelprice/{price.pk}/change/", form)
    assert saved.status_code == 302, saved.content[:2000]
    price.refresh_from_db()
    assert (price.input_per_mtok, price.note) == (Decimal("0.2"), "new list price")
    metric = RunMetric.objects.get()
    listing = browser.get("/admin/runs/runmetric/?source__exact=api")
    assert listing.status_code == 200 and b"duration_ms" in listing.content
    assert browser.get("/admin/runs/runmetric/add/").status_code == 403
    change = browser.post(f"/admin/runs/runmetric/{metric.pk}/change/", {"value": "1"})
    assert change.status_code == 403
    metric.refresh_from_db()
    assert metric.value == 5432


def test_nul_characters_are_dropped_from_names_units_and_labels(send, run):
    send(item("dura\u0000tion_ms", 1, unit="m\u0000s", labels={"k\u0000": "v\u0000"}))
    metric = RunMetric.objects.get()
    assert (metric.name, metric.unit, metric.labels) == ("duration_ms", "ms", {"k": "v"})


def test_names_and_units_with_copy_special_characters_are_stored_exactly(send, run):
    name = "tool\\bash\tcall\nline"
    send(item(name, 1, unit="a\\b", labels={"k": "tab\there\\"}))
    metric = RunMetric.objects.get()
    assert (metric.name, metric.unit, metric.labels) == (name, "a\\b", {"k": "tab\there\\"})


def test_the_api_schema_documents_the_metrics_endpoints(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/metrics/record", "/api/analytics/metrics", "/api/analytics/export"} <= set(paths)
