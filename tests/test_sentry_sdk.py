"""The real Python sentry-sdk, pointed at a live portal by its DSN, changes nothing else."""

from __future__ import annotations

import time

import pytest
import sentry_sdk
from django.db import connection

from runs.models import Run
from telemetry.models import ErrorGroup, ErrorReport, Span


@pytest.fixture
def sdk(live_server, project, settings):
    """sentry_sdk initialised with the project's DSN, as an agent's service would."""
    settings.RUNLENS_URL = live_server.url
    for scope in (sentry_sdk.get_global_scope(), sentry_sdk.get_isolation_scope()):
        scope.clear()  # tags and users of another test must not leak into this one
    sentry_sdk.init(
        dsn=project.dsn,
        release="agent@1.4.2",
        environment="staging",
        traces_sample_rate=1.0,
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    yield sentry_sdk
    # The SDK keeps its connection to the live server alive, and with it the server
    # thread's database connection: close the pool (the transport's kill() does not),
    # so the test database can be dropped at the end.
    transport = sentry_sdk.get_client().transport
    sentry_sdk.get_client().close(timeout=10)
    sentry_sdk.init(dsn=None)
    transport._pool.clear()
    wait_for(lambda: other_sessions() == 0, seconds=5)


def other_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def wait_for(predicate, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_chained_exception_arrives_with_its_frames_tags_user_and_breadcrumbs(sdk, project):
    Run.objects.create(project=project, run_id="r-7", slug="octocat__hello")
    sdk.set_tag("run_id", "r-7")
    sdk.set_user({"id": "42", "username": "octocat"})
    sdk.add_breadcrumb(category="git", message="cloned octocat/hello", level="info")

    def parse_config(text):
        return int(text)

    try:
        try:
            parse_config("not a number")
        except ValueError as exc:
            raise RuntimeError("could not load the agent config") from exc
    except RuntimeError:
        event_id = sdk.capture_exception()
    sdk.flush(timeout=10)
    assert wait_for(lambda: ErrorReport.objects.filter(event_id=event_id).exists())
    report = ErrorReport.objects.get(event_id=event_id)
    stored = report.event
    assert [e["type"] for e in stored["exception"]["values"]] == ["ValueError", "RuntimeError"]
    frames = stored["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "parse_config"
    assert stored["tags"]["run_id"] == "r-7" and stored["user"]["username"] == "octocat"
    assert stored["breadcrumbs"]["values"][-1]["message"] == "cloned octocat/hello"
    assert (report.release, report.environment) == ("agent@1.4.2", "staging")
    assert report.run.run_id == "r-7"
    assert report.group.title.startswith("RuntimeError")


def test_messages_and_a_custom_fingerprint_group_as_the_sdk_asks(sdk):
    with sdk.new_scope() as scope:
        scope.fingerprint = ["{{ default }}", "deploy"]
        first = sdk.capture_message("Deploy 17 failed", level="warning")
    second = sdk.capture_message("Deploy 17 failed", level="warning")
    sdk.flush(timeout=10)
    assert wait_for(lambda: ErrorReport.objects.filter(event_id__in=[first, second]).count() == 2)
    a = ErrorReport.objects.get(event_id=first)
    b = ErrorReport.objects.get(event_id=second)
    assert a.level == "warn"
    assert a.group_id != b.group_id  # the fingerprint adds "deploy" to the default key
    assert ErrorGroup.objects.filter(source="sentry").count() == 2


def test_a_transaction_becomes_spans_of_one_trace(sdk, project):
    with sdk.start_transaction(op="agent.run", name="fix issue 12") as transaction:
        transaction.set_tag("run_id", "r-tx")
        with sdk.start_span(op="llm.call", name="gpt call"):
            time.sleep(0.01)
        with sdk.start_span(op="git.push", name="push branch"):
            pass
    sdk.flush(timeout=10)
    assert wait_for(lambda: Span.objects.filter(project=project).count() == 3)
    spans = {s.name: s for s in Span.objects.filter(project=project)}
    root = spans["fix issue 12"]
    assert root.parent_span_id == ""
    assert spans["gpt call"].parent_span_id == root.span_id
    assert {s.trace_id for s in spans.values()} == {root.trace_id}
    assert root.run.run_id == "r-tx"
