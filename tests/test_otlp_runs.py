"""Runs known through OTLP: never orphaned for their silence; ended by session-end records."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from runs.models import Run
from tests.fixtures.otlp.payloads import (
    CHILD,
    ROOT,
    TRACE,
    log,
    logs_request,
    span,
    traces_request,
)

T1 = 1_776_748_414_123_000_000  # a minute after T0


def gastown_session(*records):
    return logs_request(
        log("session.start", attributes={"gt.run_id": "gt-1", "session": "gt-gastown-Toast"}),
        *records,
    )


def test_a_run_known_only_from_otlp_is_never_orphaned_for_its_silence(post_otlp):
    # Records and spans from April: silent for months, with the exporter's process.pid.
    post_otlp("logs", gastown_session(log("bd.call", attributes={"gt.run_id": "gt-1"})))
    post_otlp(
        "traces",
        traces_request(
            span("prime", ROOT, attributes={"gt.run_id": "gt-1"}, trace_id=TRACE),
            span("bd", CHILD, parent=ROOT, trace_id=TRACE),
        ),
    )
    call_command("detect_orphans")
    run = Run.objects.get(run_id="gt-1")
    assert run.status == "running" and not run.watched and run.pid is None
    assert not Run.objects.orphans().exists()


@pytest.mark.parametrize(
    ("attributes", "status"),
    [({}, "succeeded"), ({"status": "error"}, "failed")],
)
def test_a_session_stop_record_ends_its_run(post_otlp, attributes, status):
    stop = log("session.stop", time=T1, attributes={"gt.run_id": "gt-1", **attributes})
    post_otlp("logs", gastown_session(stop))
    run = Run.objects.get(run_id="gt-1")
    assert (run.status, run.exit_clean) == (status, True)
    assert run.finished_at.isoformat() == "2026-04-21T05:13:34.123000+00:00"
    assert run.duration_ms == 60_000


def test_a_run_that_heartbeats_is_watched_whatever_else_it_sends(post_otlp, client, token):
    post_otlp("logs", gastown_session())
    answer = client.post(
        "/api/runs/gt-1/heartbeat",
        {"phase": "WORKING"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert answer.status_code == 200
    run = Run.objects.get(run_id="gt-1")
    assert run.watched
    Run.objects.filter(pk=run.pk).update(last_heartbeat=run.created.replace(year=2025))
    call_command("detect_orphans")
    assert Run.objects.get(run_id="gt-1").status == "orphaned"
