"""Backpressure: past its bound the spool refuses writes with Retry-After, on every
spooled endpoint and before reading the body, until the workers have caught up."""

from __future__ import annotations

import time

import orjson
import pytest
from google.rpc.status_pb2 import Status

from telemetry.ingest import backlog, pipeline
from telemetry.models import IngestBatch
from tests.conftest import ndjson, record
from tests.fixtures.otlp.payloads import ROOT, log, logs_request, span, to_json, traces_request
from tests.test_sentry_receiver import envelope, event

BOUND = 2_000  # bytes of spooled body


@pytest.fixture(autouse=True)
def fresh_reading():
    """Each test starts from a fresh reading of the spool, as a new process would."""
    backlog.forget()
    yield
    backlog.forget()


@pytest.fixture
def small_bound(settings):
    settings.BACKLOG_MAX_BYTES_PER_PROJECT = BOUND
    settings.BACKLOG_RETRY_AFTER_SECONDS = 7
    return settings


def spool_without_a_worker(client, token, size: int) -> None:
    """Events spooled while no worker runs: the wake-up is never sent (no commit
    callbacks run in a test's transaction), so the batches stay pending."""
    lines = [
        record("tool.call", run_id="r1", data={"n": i, "pad": f"{i:x}" * 40}) for i in range(size)
    ]
    response = client.post(
        "/api/ingest/events",
        ndjson(*lines),
        "application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 202, response.content


def fill_past_the_bound(client, token) -> None:
    while sum(b for _, _, b, _ in IngestBatch.objects.backlog()) < BOUND:
        spool_without_a_worker(client, token, 50)
    backlog.forget()


def drain_everything() -> None:
    for kind in IngestBatch.Kind.values:
        pipeline.drain(kind)
    assert not IngestBatch.objects.filter(state="pending").exists()


def write_requests(client, project, token) -> dict[str, object]:
    """One request to every spooled endpoint, by name: each returns its response."""
    bearer = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    sentry_auth = {
        "HTTP_X_SENTRY_AUTH": f"Sentry sentry_version=7, sentry_key={project.public_key}"
    }
    otlp = orjson.dumps(to_json(logs_request(log("bd.call", attributes={"run.id": "r2"}))))
    return {
        "events": lambda: client.post(
            "/api/ingest/events",
            ndjson(record("a.b", run_id="r2")),
            "application/x-ndjson",
            **bearer,
        ),
        "metrics": lambda: client.post(
            "/api/metrics/record",
            {"metric_name": "duration_ms", "metric_value": 5},
            "application/json",
            **bearer,
        ),
        "otlp logs": lambda: client.post("/v1/logs", otlp, "application/json", **bearer),
        "otlp metrics": lambda: client.post(
            "/v1/metrics", b'{"resourceMetrics": []}', "application/json", **bearer
        ),
        "otlp traces (protobuf)": lambda: client.post(
            "/v1/traces",
            traces_request(span("root", ROOT)).SerializeToString(),
            "application/x-protobuf",
            **bearer,
        ),
        "sentry envelope": lambda: client.post(
            f"/api/{project.pk}/envelope/",
            envelope(({"type": "event"}, event())),
            "application/x-sentry-envelope",
            **sentry_auth,
        ),
        "sentry store": lambda: client.post(
            f"/api/{project.pk}/store/", orjson.dumps(event()), "application/json", **sentry_auth
        ),
    }


def test_past_the_bound_every_spooled_endpoint_refuses_with_retry_after(
    client, project, token, small_bound
):
    fill_past_the_bound(client, token)
    pending = IngestBatch.objects.count()

    for name, send in write_requests(client, project, token).items():
        response = send()
        assert response["Retry-After"] == "7", name
        if name.startswith("sentry"):
            # What Sentry SDKs pause on; a 503 they would only drop and send the next.
            assert response.status_code == 429, name
            assert response["X-Sentry-Rate-Limits"] == "7::project:backlog"
            assert "BACKLOG_MAX_BYTES_PER_PROJECT" in response.json()["detail"]
        elif name.startswith("otlp"):
            assert response.status_code == 503, name
            if "protobuf" in name:
                status = Status.FromString(response.content)
            else:
                status = Status(**orjson.loads(response.content))
            assert status.code == 14  # UNAVAILABLE: what exporters retry
            assert "backlog" in status.message
        else:
            assert response.status_code == 503, name
            assert "ingest backlog" in response.json()["detail"]
    assert IngestBatch.objects.count() == pending  # nothing more was spooled


def test_after_the_workers_catch_up_writes_are_accepted_again_within_a_second(
    client, project, token, small_bound
):
    fill_past_the_bound(client, token)
    assert write_requests(client, project, token)["events"]().status_code == 503

    drain_everything()
    time.sleep(backlog.REFRESH_S + 0.1)  # no hand-made reset: the reading refreshes itself

    for name, send in write_requests(client, project, token).items():
        assert send().status_code in (200, 202), name


def test_the_bound_is_per_project_and_others_still_write(client, token, stranger, small_bound):
    fill_past_the_bound(client, token)
    other, other_token = stranger
    response = write_requests(client, other, other_token)["events"]()
    assert response.status_code == 202


def test_past_the_installations_bound_every_project_is_refused(client, token, stranger, settings):
    settings.BACKLOG_MAX_BYTES = BOUND
    fill_past_the_bound(client, token)
    other, other_token = stranger
    response = write_requests(client, other, other_token)["events"]()
    assert response.status_code == 503
    assert "BACKLOG_MAX_BYTES)" in response.json()["detail"]


def test_the_refusal_comes_before_the_body_is_read(client, token, small_bound, settings):
    fill_past_the_bound(client, token)
    too_large = b"x" * (settings.INGEST_MAX_BYTES + 1)
    response = client.post(
        "/api/ingest/events",
        too_large,
        "application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 503  # not 413: the body was never read


def test_a_retry_of_an_accepted_request_is_still_answered(client, token, small_bound):
    body = ndjson(record("a.b", run_id="r3"))
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_IDEMPOTENCY_KEY": "k-1"}
    first = client.post("/api/ingest/events", body, "application/x-ndjson", **headers)
    fill_past_the_bound(client, token)

    again = client.post("/api/ingest/events", body, "application/x-ndjson", **headers)
    assert again.status_code == 202  # it stores nothing: no reason to refuse it
    assert again.json()["batch"] == first.json()["batch"]


def test_the_browser_beacon_is_not_spooled_and_not_refused(client, project, token, small_bound):
    fill_past_the_bound(client, token)
    response = client.post(
        f"/api/frontend-log?key={project.public_key}",
        b'{"level": "error", "message": "boom"}',
        content_type="text/plain",
    )
    assert response.status_code == 202


def test_health_and_the_status_page_show_the_backlog_against_its_bound(
    client, operator_client, project, token, small_bound
):
    project.name = "<b>Acme</b>"
    project.save()
    fill_past_the_bound(client, token)

    metrics = client.get("/health").json()["metrics"]
    assert metrics["ingest_backlog_bytes"] >= BOUND
    assert metrics["ingest_backlog_max_bytes"] == small_bound.BACKLOG_MAX_BYTES

    page = operator_client.get("/status").content.decode()
    assert "Backlog and backpressure" in page
    assert "&lt;b&gt;Acme&lt;/b&gt;" in page and "<b>Acme</b>" not in page
    assert "refused" in page
    assert "Bound per project" in page


def test_reading_the_backlog_is_cached_for_a_second_per_process(
    client, token, small_bound, django_assert_num_queries
):
    backlog.current()
    with django_assert_num_queries(0):
        for _ in range(20):
            backlog.refusal(1)
