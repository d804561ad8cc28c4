"""The /status page: the /health counters for people, workers seen, the last retention
run, and a panel that refreshes itself through htmx while keeping a real link."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs.models import Run
from telemetry import health
from telemetry.models import IngestBatch

PANEL = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "status-panel"}


@pytest.fixture(autouse=True)
def state_dir(settings, tmp_path):
    """Worker heartbeats and the retention record go to a private var/ for each test."""
    settings.VAR_DIR = tmp_path
    return tmp_path / "status"


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


def test_it_lists_workers_with_their_names_escaped(operator_client, project, state_dir):
    health.record_worker("celery@<script>alert(1)</script>")
    old = state_dir / "workers" / "celery@stale.json"
    stale_at = (timezone.now() - timedelta(minutes=30)).isoformat()
    old.write_text(json.dumps({"hostname": "celery@stale", "at": stale_at}))
    html = operator_client.get("/status").content.decode()
    assert "celery@&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert 'class="stale"><code>celery@stale</code>' in html and "(not recently)" in html


def test_a_worker_notes_itself_at_most_once_per_throttle(state_dir):
    health.record_worker("celery@busy", throttle_s=60)
    first = (state_dir / "workers" / "celery@busy.json").stat().st_mtime_ns
    health.record_worker("celery@busy", throttle_s=60)
    assert (state_dir / "workers" / "celery@busy.json").stat().st_mtime_ns == first
    assert [w["hostname"] for w in health.workers()] == ["celery@busy"]


def test_the_beat_heartbeat_does_nothing_when_run_eagerly(state_dir, db):
    health.worker_heartbeat.delay()  # tests run tasks eagerly, inside this process
    assert not (state_dir / "workers").exists()


def test_a_prune_is_recorded_and_shown(operator_client, project, state_dir):
    call_command("prune")
    recorded = health.last_retention()
    assert recorded is not None and recorded["runs_deleted"] == 0
    assert timezone.now() - recorded["at"] < timedelta(seconds=30)
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
