"""The /status page: the /health counters for people, workers seen, the last retention
run (both kept in PostgreSQL), and a panel that refreshes itself through htmx while
keeping a real link."""

from __future__ import annotations

from datetime import timedelta

from django.core.management import call_command
from django.utils import timezone

from runs.models import Run
from telemetry import health
from telemetry.models import IngestBatch, JobRun, WorkerHeartbeat

PANEL = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "status-panel"}


def test_anonymous_visitors_are_sent_to_log_in(client, db):
    response = client.get("/status")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/status"


def test_it_shows_the_counters_and_polls_its_panel(operator_client, project):
    Run.objects.create(project=project, run_id="a", status="running")
    Run.objects.create(project=project, run_id="b", status="orphaned")
    IngestBatch.objects.create(
        project=project, body=b"", received_at=timezone.now() - timedelta(minutes=3)
    )
    response = operator_client.get("/status")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'hx-get="/status" hx-trigger="every 5s"' in html
    assert 'href="/status">Refresh</a>' in html  # the real link
    assert 'aria-current="page">Status</a>' in html
    assert '<a href="/?status=orphaned">1</a>' in html
    assert 'Backlog (batches)</dt><dd class="warn">1</dd>' in html
    assert "3m 0" in html  # the oldest pending batch's age
    assert "Retention has not run yet" in html
    assert "No worker has reported yet" in html


def test_the_poll_gets_only_the_panel(operator_client, project):
    response = operator_client.get("/status", **PANEL)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<div id="status-panel"') and "<html" not in html
    assert response["Vary"] == "HX-Request, HX-Target" or "HX-Target" in response["Vary"]


def test_it_lists_workers_with_their_names_escaped(operator_client, project):
    health.record_worker("celery@<script>alert(1)</script>", queues="ingest", started=True)
    stale_at = timezone.now() - timedelta(minutes=30)
    WorkerHeartbeat.objects.create(hostname="celery@stale", started_at=stale_at, seen_at=stale_at)
    html = operator_client.get("/status").content.decode()
    assert "celery@&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert 'class="stale"><code>celery@stale</code>' in html and "(not recently)" in html


def test_a_worker_notes_itself_at_most_once_per_throttle(db):
    health.record_worker("celery@busy", throttle_s=60)
    first = WorkerHeartbeat.objects.get().seen_at
    health.record_worker("celery@busy", throttle_s=60)
    assert WorkerHeartbeat.objects.get().seen_at == first
    assert [w["hostname"] for w in health.workers()] == ["celery@busy"]


def test_workers_silent_for_a_week_are_forgotten(db):
    long_ago = timezone.now() - timedelta(days=8)
    WorkerHeartbeat.objects.create(hostname="celery@gone", started_at=long_ago, seen_at=long_ago)
    assert health.workers() == []
    assert not WorkerHeartbeat.objects.exists()


def test_a_worker_heartbeat_is_kept_in_the_database_not_under_the_var_dir(db, settings):
    """Web and workers on different hosts share only PostgreSQL and the broker (issue 14)."""
    health.record_worker("celery@elsewhere", queues="ingest,housekeeping", started=True)
    assert not (settings.VAR_DIR / "status").exists()
    (seen,) = health.workers()
    assert (seen["hostname"], seen["queues"], seen["recent"]) == (
        "celery@elsewhere",
        "ingest,housekeeping",
        True,
    )
    assert health.counters()["workers_seen"] == 1


def test_a_prune_is_recorded_and_shown(operator_client, project, settings):
    call_command("prune")
    recorded = health.last_retention()
    assert recorded is not None and recorded["runs_deleted"] == 0
    assert timezone.now() - recorded["at"] < timedelta(seconds=30)
    assert JobRun.objects.get(job="retention").result["reports_deleted"] == 0
    assert not (settings.VAR_DIR / "status").exists()
    html = operator_client.get("/status").content.decode()
    assert "0 runs, 0 error reports" in html


def test_it_shows_the_last_stored_batch(operator_client, project):
    IngestBatch.objects.create(
        project=project,
        body=b"",
        state="done",
        processed_at=timezone.now() - timedelta(minutes=5),
    )
    html = operator_client.get("/status").content.decode()
    assert "5m ago" in html
