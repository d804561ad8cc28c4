"""Background jobs: batch processing, the sweeper, orphan detection, retention."""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs.batches import RunBatch
from runs.models import Event, Run
from telemetry import tasks
from telemetry.ingest import pipeline
from telemetry.models import IngestBatch
from telemetry.receivers import events
from tests.conftest import ndjson, record


def spooled(client, token, body: bytes, run_id: str = "r") -> IngestBatch:
    """Accept a request without running its on-commit hook: the batch stays pending."""
    response = client.post(
        f"/api/ingest/events?run_id={run_id}",
        body,
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 202
    return IngestBatch.objects.get(pk=response.json()["batch"])


def test_a_batch_is_durable_before_the_answer_and_processed_later(client, token):
    batch = spooled(client, token, ndjson(record("a.b"), record("a.c")))
    assert batch.state == "pending"
    assert not Event.objects.exists()
    assert pipeline.process(batch.id) is True
    batch.refresh_from_db()
    assert (batch.state, batch.attempts) == ("done", 1)
    assert Event.objects.count() == 2


def test_processing_twice_stores_once(client, token):
    batch = spooled(client, token, ndjson(record("a.b"), record("a.c")))
    assert pipeline.process(batch.id) is True
    assert pipeline.process(batch.id) is False
    assert Event.objects.count() == 2
    assert Run.objects.get().events_count == 2


def test_a_worker_dying_before_commit_leaves_nothing_and_a_rerun_stores_once(
    client, token, monkeypatch
):
    batch = spooled(client, token, ndjson(record("a.b"), record("a.c")))

    def die(*args, **kwargs):
        raise RuntimeError("worker killed")

    # Fail after the COPY, inside the transaction: PostgreSQL rolls it all back.
    monkeypatch.setattr(RunBatch, "save", die)
    with pytest.raises(RuntimeError):
        pipeline.process(batch.id)
    assert not Event.objects.exists()
    batch.refresh_from_db()
    assert (batch.state, batch.attempts) == ("pending", 1)
    assert "worker killed" in batch.error

    monkeypatch.undo()
    assert pipeline.process(batch.id) is True
    assert Event.objects.count() == 2
    assert Run.objects.get().events_count == 2


def test_a_batch_that_keeps_failing_is_marked_failed_and_kept(client, token, monkeypatch):
    batch = spooled(client, token, ndjson(record("a.b")))
    monkeypatch.setattr(events, "store_records", lambda *a: 1 / 0)
    for _ in range(IngestBatch.MAX_ATTEMPTS):
        with pytest.raises(ZeroDivisionError):
            pipeline.process(batch.id)
    batch.refresh_from_db()
    assert batch.state == "failed"
    assert batch.body  # the raw body stays for a later re-run


def test_the_sweeper_reenqueues_batches_left_pending(client, token):
    fresh = spooled(client, token, ndjson(record("a.b")), run_id="fresh")
    stale = spooled(client, token, ndjson(record("a.c")), run_id="stale")
    IngestBatch.objects.filter(pk=stale.pk).update(
        received_at=timezone.now() - timedelta(minutes=5)
    )
    assert tasks.sweep_pending() == 1  # eager: processed right away
    assert IngestBatch.objects.get(pk=stale.pk).state == "done"
    assert IngestBatch.objects.get(pk=fresh.pk).state == "pending"
    call_command("process_batches")
    assert IngestBatch.objects.get(pk=fresh.pk).state == "done"


# --- Orphans ------------------------------------------------------------------


def make_run(project, run_id: str, **fields) -> Run:
    fields.setdefault("phase", "WORKING")
    return Run.objects.create(project=project, run_id=run_id, **fields)


def test_a_silent_run_in_a_working_phase_becomes_orphaned(project):
    now = timezone.now()
    make_run(project, "silent", last_heartbeat=now - timedelta(seconds=91))
    make_run(project, "alive", last_heartbeat=now - timedelta(seconds=30))
    make_run(
        project,
        "chatty",
        last_heartbeat=now - timedelta(minutes=10),
        last_event_at=now - timedelta(seconds=5),
    )
    make_run(project, "clean", exit_clean=True, last_heartbeat=now - timedelta(hours=1))
    make_run(project, "done", phase="DONE", last_heartbeat=now - timedelta(hours=1))
    make_run(project, "finished", status="succeeded", last_heartbeat=now - timedelta(hours=1))
    assert Run.objects.mark_orphans() == 1
    assert list(Run.objects.filter(status="orphaned").values_list("run_id", flat=True)) == [
        "silent"
    ]
    assert Run.objects.mark_orphans() == 0  # idempotent


def test_a_watched_run_that_never_spoke_is_orphaned_after_the_grace_period(project):
    make_run(project, "mute", created=timezone.now() - timedelta(minutes=5), watched=True)
    call_command("detect_orphans")
    assert Run.objects.get(run_id="mute").status == "orphaned"


def test_a_run_without_any_sign_of_life_promised_is_never_orphaned(project):
    # No heartbeat, no pid, no run.begin: a run known only from OTLP records and spans.
    make_run(project, "otel-only", created=timezone.now() - timedelta(hours=1))
    call_command("detect_orphans")
    assert Run.objects.get(run_id="otel-only").status == "running"


def test_a_run_that_began_and_went_silent_is_orphaned(post_events, project):
    long_ago = (timezone.now() - timedelta(minutes=10)).isoformat()
    post_events(
        ndjson(record("run.begin", ts=long_ago), record("llm.call", ts=long_ago)), run_id="g"
    )
    assert Run.objects.get(run_id="g").watched
    call_command("detect_orphans")
    assert Run.objects.get(run_id="g").status == "orphaned"


def test_a_run_on_this_host_whose_process_is_gone_is_orphaned_at_once(project):
    # SPEC §7: a pid known dead on its host. Our own host can tell without waiting.
    gone = subprocess.Popen(["true"])
    gone.wait()
    here, now = socket.gethostname(), timezone.now()
    make_run(project, "dead", host=here, pid=gone.pid, last_heartbeat=now)
    make_run(project, "living", host=here, pid=os.getpid(), last_heartbeat=now)
    make_run(project, "elsewhere", host="another-box", pid=gone.pid, last_heartbeat=now)
    make_run(project, "ended", host=here, pid=gone.pid, phase="DONE", last_heartbeat=now)
    assert Run.objects.mark_orphans() == 1
    assert Run.objects.get(status="orphaned").run_id == "dead"


# --- Retention ----------------------------------------------------------------


def test_retention_keeps_the_newest_runs_per_slug_and_their_events(project, post_events):
    project.retention_runs_per_slug = 3
    project.save()
    for i in range(5):
        post_events(
            ndjson(record("run.begin", slug="o__a"), record("run.exit_clean")), run_id=f"a{i}"
        )
    post_events(ndjson(record("run.begin", slug="o__b"), record("run.exit_clean")), run_id="b0")
    post_events(ndjson(record("run.begin", slug="o__a")), run_id="a-live")
    call_command("prune")
    kept = set(Run.objects.values_list("run_id", flat=True))
    assert kept == {"a2", "a3", "a4", "b0", "a-live"}
    assert Event.objects.count() == 2 * 4 + 1
    assert set(Event.objects.values_list("run__run_id", flat=True)) == kept


def test_retention_drops_runs_older_than_the_max_age(project, post_events):
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="old")
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="new")
    Run.objects.filter(run_id="old").update(created=timezone.now() - timedelta(days=31))
    call_command("prune")
    assert list(Run.objects.values_list("run_id", flat=True)) == ["new"]
    assert Event.objects.count() == 2


def test_a_pruned_run_takes_its_spans_and_metric_points_with_it(project, post_events, post_otlp):
    from runs.models import RunMetric
    from telemetry.models import Span
    from tests.fixtures.otlp.payloads import ROOT, span, traces_request

    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="old")
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="new")
    old, new = Run.objects.get(run_id="old"), Run.objects.get(run_id="new")
    post_otlp("traces", traces_request(span("agent.run", ROOT)))
    Span.objects.update(run=old)
    span = Span.objects.first()
    span.pk, span.span_id, span.run = None, "f" * 16, new
    span.save()
    for run in (old, new):
        RunMetric.objects.create(project=project, run=run, name="duration_ms", value=1)
    Run.objects.filter(run_id="old").update(created=timezone.now() - timedelta(days=31))

    call_command("prune")

    assert set(Span.objects.values_list("run__run_id", flat=True)) == {"new"}
    assert list(RunMetric.objects.values_list("run__run_id", flat=True)) == ["new"]


def test_spans_and_points_of_no_run_age_out_with_the_projects_maximum_age(project, post_otlp):
    from runs.models import RunMetric
    from telemetry.models import Span
    from tests.fixtures.otlp.payloads import ROOT, span, traces_request

    post_otlp("traces", traces_request(span("agent.run", ROOT)))
    Span.objects.update(run=None)
    old = timezone.now() - timedelta(days=31)
    young = Span.objects.first()
    young.pk, young.span_id, young.start_time = None, "e" * 16, timezone.now()
    young.save()
    Span.objects.exclude(pk=young.pk).update(start_time=old)
    RunMetric.objects.create(project=project, name="fleet.size", value=3, recorded_at=old)
    RunMetric.objects.create(project=project, name="fleet.size", value=4)

    call_command("prune")

    assert list(Span.objects.values_list("pk", flat=True)) == [young.pk]
    assert list(RunMetric.objects.values_list("value", flat=True)) == [4.0]
