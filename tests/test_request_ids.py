"""Request ids: echoed, on every log line of their request, on reports, and into Celery tasks."""

from __future__ import annotations

import json
import logging
import os

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from portal import celery as portal_celery
from portal.celery import app as celery_app
from portal.logging import JsonFormatter, RequestIdFilter, request_id_var
from telemetry.models import ErrorReport
from tests.conftest import ndjson, record, redis_url
from tests.test_worker import celery_worker, use_broker, wait_for

REDIS_URL = os.environ.get("TEST_REQUEST_IDS_REDIS_URL") or redis_url(13)


def as_json(rec: logging.LogRecord) -> dict:
    """The line the stdout handler writes for a record (filter, then formatter)."""
    RequestIdFilter().filter(rec)
    return json.loads(JsonFormatter().format(rec))


def test_a_sane_request_id_is_echoed_and_anything_else_is_replaced(client, project):
    for url in ("/no/such/page", "/errors", f"/api/frontend-log?key={project.public_key}"):
        assert client.get(url, HTTP_X_REQUEST_ID="req-abc-12345")["X-Request-ID"] == (
            "req-abc-12345"
        )
        replaced = client.get(url, HTTP_X_REQUEST_ID='"><script>')["X-Request-ID"]
        assert len(replaced) == 36 and replaced[14] == "7"


def test_django_request_warnings_carry_the_request_id(client, caplog):
    with caplog.at_level(logging.WARNING, logger="django.request"):
        response = client.get("/no/such/page", HTTP_X_REQUEST_ID="req-notfound-1")
    assert response.status_code == 404
    (rec,) = [r for r in caplog.records if r.name == "django.request"]
    line = as_json(rec)
    assert (line["request_id"], line["status_code"], line["path"]) == (
        "req-notfound-1",
        404,
        "/no/such/page",
    )
    assert "request" not in line  # the HttpRequest object itself is not dumped


def test_log_lines_inside_a_request_carry_its_id(client, project, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.alerts"):
        client.post(
            f"/api/frontend-log?key={project.public_key}",
            '{"message": "first of its kind"}',
            content_type="text/plain",
            HTTP_X_REQUEST_ID="req-alert-0001",
        )
    (rec,) = [r for r in caplog.records if r.name == "runlens.alerts"]
    assert as_json(rec)["request_id"] == "req-alert-0001"
    assert ErrorReport.objects.get().request_id == "req-alert-0001"


@override_settings(LOG_REQUESTS=True)
def test_with_log_requests_every_request_logs_one_line(client, caplog, db):
    with caplog.at_level(logging.INFO, logger="runlens.request"):
        client.get("/login/", HTTP_X_REQUEST_ID="req-logline-1")
        client.get("/health", HTTP_X_REQUEST_ID="req-health-01")
    lines = [as_json(r) for r in caplog.records if r.name == "runlens.request"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["method"], line["path"], line["status"], line["request_id"]) == (
        "GET",
        "/login/",
        200,
        "req-logline-1",
    )
    assert isinstance(line["duration_ms"], float) and line["msg"] == "GET /login/ 200"


@override_settings(LOG_HEALTH_REQUESTS=True)
def test_health_requests_are_logged_only_when_asked(client, caplog, db):
    with caplog.at_level(logging.INFO, logger="runlens.request"):
        client.get("/login/")
        client.get("/health")
        client.get("/health/live")
    paths = [r.path for r in caplog.records if r.name == "runlens.request"]
    assert paths == ["/health", "/health/live"]


def test_request_logging_is_off_by_default(client, caplog):
    with caplog.at_level(logging.INFO, logger="runlens.request"):
        client.get("/login/")
    assert [r for r in caplog.records if r.name == "runlens.request"] == []


def test_a_task_sent_during_a_request_carries_its_id_and_the_worker_restores_it():
    headers: dict = {}
    token = request_id_var.set("req-publish-01")
    try:
        portal_celery.add_request_id(headers=headers)
    finally:
        request_id_var.reset(token)
    assert headers == {"request_id": "req-publish-01"}

    class Task:
        class request:  # noqa: N801 - what Celery's task.request looks like
            request_id = "req-publish-01"

    seen = []
    portal_celery.set_request_id(task_id="t1", task=Task)
    seen.append(request_id_var.get())
    portal_celery.reset_request_id(task_id="t1")
    seen.append(request_id_var.get())
    assert seen == ["req-publish-01", ""]


# --- A real worker process ------------------------------------------------------------


@pytest.fixture
def worker_log(tmp_path):
    """A Celery worker over Redis (db 13), against the test database; yields its log path."""
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; .ci/run starts it")
    celery_app.conf.task_always_eager = False
    use_broker(REDIS_URL)
    # DEBUG: Celery's own per-task lines are checked too, and INFO hides them.
    try:
        with celery_worker(
            tmp_path, "--pool", "solo", CELERY_BROKER_URL=REDIS_URL, LOG_LEVEL="DEBUG"
        ):
            yield tmp_path / "worker.log"
    finally:
        celery_app.conf.task_always_eager = True
        use_broker(settings.CELERY_BROKER_URL)
        celery_app.conf.broker_transport_options = settings.CELERY_BROKER_TRANSPORT_OPTIONS


def json_lines(path) -> list[dict]:
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_worker_logs_and_stores_with_the_id_of_the_request_that_enqueued_the_task(
    worker_log, client, token
):
    response = client.post(
        "/api/ingest/events?run_id=traced",
        ndjson(record("run.begin"), record("tool.error", level="error", message="boom")),
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_X_REQUEST_ID="req-worker-0001",
    )
    assert response.status_code == 202

    def task_line() -> dict | None:
        for line in json_lines(worker_log):
            if line.get("logger") == "telemetry.tasks" and "stored" in line.get("msg", ""):
                return line
        return None

    assert wait_for(lambda: task_line() is not None), "the worker logged no task line"
    assert task_line()["request_id"] == "req-worker-0001"
    # Celery's own "succeeded" line comes after our task code returned: it has the id
    # from the message header, not from the batch row the task could have read.
    succeeded = [
        line
        for line in json_lines(worker_log)
        if line.get("logger") == "celery.app.trace" and "succeeded" in line.get("msg", "")
    ]
    assert [line["request_id"] for line in succeeded] == ["req-worker-0001"]
    # The worker's error report from the error-level event names the request too.
    assert wait_for(lambda: ErrorReport.objects.exists())
    assert ErrorReport.objects.get().request_id == "req-worker-0001"
