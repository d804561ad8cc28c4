"""GET /health and /health/live: the SPEC §4 body, real counters, a real broker check,
and a real unreachable database (the connection pointed at a closed port)."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from runs.models import Event, Run
from telemetry import health
from telemetry.ingest import store
from telemetry.models import ErrorGroup, ErrorReport, IngestBatch
from tests.conftest import ndjson, record

KEYS = {"status", "version", "commit", "uptime_seconds", "db_ok", "broker_ok", "metrics"}
METRIC_KEYS = {
    "runs_total",
    "runs_active",
    "runs_orphaned",
    "events_last_24h",
    "errors_last_24h",
    "ingest_backlog",
    "oldest_pending_batch_s",
    "workers_seen",
    # Backpressure (docs/reliability.md), beyond the SPEC's keys.
    "ingest_backlog_bytes",
    "ingest_backlog_max_bytes",
}


def closed_port() -> tuple[socket.socket, int]:
    """A port bound but not listening: connecting is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def make_run(project, run_id: str, status: str = "succeeded", **fields) -> Run:
    now = timezone.now()
    return Run.objects.create(
        project=project,
        run_id=run_id,
        slug=fields.pop("slug", "octocat__hello-world"),
        status=status,
        started_at=fields.pop("started_at", now),
        last_heartbeat=fields.pop("last_heartbeat", now),
        **fields,
    )


def add_event(run: Run, seq: int, ts, level: str = "info", event: str = "x.y") -> None:
    event = Event.objects.create(run=run, seq=seq, ts=ts, level=level, event=event, data={})
    store._count_events(run.project, [event])  # as the worker counts what it stores


@pytest.fixture
def world(project):
    """Four runs: live, marked orphaned, silent for 10 minutes (still `running`), done.
    Events of today and of two days ago; a beacon error today; one pending batch."""
    now = timezone.now()
    live = make_run(project, "live", "running")
    make_run(project, "lost", "orphaned")
    silent = make_run(project, "silent", "running", last_heartbeat=now - timedelta(minutes=10))
    silent.started_at = now - timedelta(minutes=20)
    silent.save()
    done = make_run(project, "done")
    add_event(live, 1, now - timedelta(minutes=5))
    add_event(live, 2, now - timedelta(hours=23), level="error")
    add_event(done, 1, now - timedelta(days=2), level="error")  # outside the day
    group = ErrorGroup.objects.create(
        project=project, fingerprint="f", title="TypeError", first_seen=now, last_seen=now
    )
    ErrorReport.objects.create(group=group, project=project, source="frontend")
    ErrorReport.objects.create(group=group, project=project, source="event")  # = the event
    IngestBatch.objects.create(project=project, body=b"", received_at=now - timedelta(seconds=120))
    IngestBatch.objects.create(project=project, body=b"", state="done", processed_at=now)
    return now


def test_it_answers_ok_with_every_field_of_the_spec(client, db):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == KEYS
    assert set(body["metrics"]) == METRIC_KEYS
    assert body["status"] == "ok"
    assert body["db_ok"] is True and body["broker_ok"] is True
    assert body["version"] == "0.1.0"
    assert isinstance(body["commit"], str) and body["commit"]
    assert isinstance(body["uptime_seconds"], int) and body["uptime_seconds"] >= 0
    assert response["Cache-Control"].startswith("max-age=0")


def test_it_counts_a_small_world(client, world):
    metrics = client.get("/health").json()["metrics"]
    assert metrics == {
        "runs_total": 4,
        "runs_active": 2,  # live and silent are both still `running`
        "runs_orphaned": 2,  # marked orphaned, and silent past ORPHAN_AFTER_SECONDS
        "events_last_24h": 2,
        "errors_last_24h": 2,  # the error event of today and the beacon report
        "ingest_backlog": 1,
        "oldest_pending_batch_s": pytest.approx(120, abs=5),
        "workers_seen": 0,
        "ingest_backlog_bytes": 0,  # the pending batch of this world has an empty body
        "ingest_backlog_max_bytes": 512 * 1024 * 1024,
    }


def test_its_counters_take_a_fixed_number_of_queries(client, world, django_assert_max_num_queries):
    with django_assert_max_num_queries(6):
        client.get("/health")


def test_it_takes_the_commit_from_the_build(settings):
    health.commit.cache_clear()
    try:
        settings.RUNLENS_COMMIT = "abc1234"
        assert health.commit() == "abc1234"
        health.commit.cache_clear()
        settings.RUNLENS_COMMIT = ""
        # This checkout has a .git: the commit is its HEAD, never empty.
        assert health.commit() != ""
    finally:
        health.commit.cache_clear()


def test_it_is_degraded_when_an_amqp_broker_refuses(client, db):
    sock, port = closed_port()
    with sock, override_settings(CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{port}//"):
        response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["broker_ok"] is False and body["db_ok"] is True


def test_it_is_degraded_when_a_redis_broker_refuses(client, db):
    sock, port = closed_port()
    with sock, override_settings(CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0"):
        body = client.get("/health").json()
    assert body["status"] == "degraded" and body["broker_ok"] is False


def test_it_is_degraded_when_the_filesystem_broker_folder_is_gone(client, db, tmp_path):
    options = {
        "data_folder_in": str(tmp_path / "missing"),
        "data_folder_out": str(tmp_path / "missing"),
        "control_folder": str(tmp_path),
    }
    with override_settings(
        CELERY_BROKER_URL="filesystem://", CELERY_BROKER_TRANSPORT_OPTIONS=options
    ):
        body = client.get("/health").json()
        assert body["status"] == "degraded" and body["broker_ok"] is False
        (tmp_path / "missing").mkdir()
        assert client.get("/health").json()["broker_ok"] is True


def test_it_answers_503_when_the_database_is_down(client, django_db_blocker):
    sock, port = closed_port()
    with sock, django_db_blocker.unblock():
        saved = dict(connection.settings_dict)
        connection.close()
        connection.settings_dict["PORT"] = str(port)
        try:
            response = client.get("/health")
        finally:
            connection.close()
            connection.settings_dict.clear()
            connection.settings_dict.update(saved)
    assert response.status_code == 503
    body = response.json()
    assert set(body) == KEYS
    assert body["db_ok"] is False and body["status"] == "down"
    assert body["metrics"] == dict.fromkeys(METRIC_KEYS)


def test_live_answers_without_touching_the_database(client):
    # No `db` fixture: any query would fail this test.
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_it_refuses_other_methods_with_a_json_body(client, db):
    response = client.post("/health")
    assert response.status_code == 405
    assert "detail" in response.json()


def test_health_requests_are_not_logged_unless_asked(client, db, caplog, settings):
    settings.LOG_REQUESTS = True
    with caplog.at_level(logging.INFO, logger="runlens.request"):
        client.get("/health")
        client.get("/health/live")
        assert not [r for r in caplog.records if r.name == "runlens.request"]
        settings.LOG_HEALTH_REQUESTS = True
        client.get("/health")
    assert [r.path for r in caplog.records if r.name == "runlens.request"] == ["/health"]


def test_events_of_the_day_are_counted_from_what_the_worker_stored(client, post_events):
    # The counts come from the per-minute tally the worker keeps, not from the events.
    now = timezone.now()
    recent, old = now - timedelta(minutes=3), now - timedelta(days=3)
    post_events(
        ndjson(
            record("a.b", ts=recent.isoformat()),
            record("a.b", ts=recent.isoformat(), level="error"),
            record("a.b", ts=old.isoformat(), level="error"),
        ),
        run_id="r",
    )
    post_events(ndjson(record("a.c", ts=recent.isoformat())), run_id="r")
    metrics = client.get("/health").json()["metrics"]
    assert metrics["events_last_24h"] == 3
    assert metrics["errors_last_24h"] == 1
