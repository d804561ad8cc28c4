"""Admin triage: runs, events, projects and ingest batches."""

from __future__ import annotations

import re

import pytest
from django.contrib.messages import get_messages

from runs.models import Artifact, Event, Project, Run
from telemetry.models import IngestBatch
from tests.conftest import ndjson, record


@pytest.fixture
def runs(post_events) -> dict[str, Run]:
    post_events(
        ndjson(record("run.begin", slug="o__a"), record("step", level="error")), run_id="a1"
    )
    post_events(ndjson(record("run.begin", slug="o__b"), record("run.exit_clean")), run_id="b1")
    post_events(ndjson(record("run.begin", slug="o__b")), run_id="b2")
    Run.objects.filter(run_id="b2").update(status=Run.Status.ORPHANED)
    return {run.run_id: run for run in Run.objects.all()}


def listed(response) -> set[str]:
    body = response.content.decode()
    return {rid for rid in ("a1", "b1", "b2") if f">{rid}</a>" in body}


def test_only_staff_reach_the_admin(operator_client, client):
    assert operator_client.get("/admin/runs/run/").status_code == 302  # logged in, not staff
    assert client.get("/admin/runs/run/").status_code == 302


def test_runs_filter_by_status_slug_and_project_and_search_by_run_id(admin_client, runs, stranger):
    url = "/admin/runs/run/"
    assert listed(admin_client.get(url)) == {"a1", "b1", "b2"}
    assert listed(admin_client.get(f"{url}?status__exact=orphaned")) == {"b2"}
    assert listed(admin_client.get(f"{url}?slug=o__b")) == {"b1", "b2"}
    project = runs["a1"].project_id
    assert listed(admin_client.get(f"{url}?project__id__exact={project}")) == {"a1", "b1", "b2"}
    other = stranger[0].pk
    assert listed(admin_client.get(f"{url}?project__id__exact={other}")) == set()
    assert listed(admin_client.get(f"{url}?q=b")) == {"b1", "b2"}
    assert listed(admin_client.get(f"{url}?q=a1")) == {"a1"}


def test_reset_orphaned_marks_only_orphaned_runs_cancelled(admin_client, runs):
    response = admin_client.post(
        "/admin/runs/run/",
        {"action": "reset_orphaned", "_selected_action": [r.pk for r in runs.values()]},
        follow=True,
    )
    assert "1 orphaned run(s) marked cancelled." in response.content.decode()
    statuses = dict(Run.objects.values_list("run_id", "status"))
    assert statuses == {"a1": "running", "b1": "succeeded", "b2": "cancelled"}


def test_deleting_runs_in_the_admin_deletes_their_events_and_artifacts(admin_client, runs):
    Artifact.store(runs["a1"], "notes.txt", b"x", "text/plain")
    selected = [runs["a1"].pk, runs["b1"].pk]
    confirm = admin_client.post(
        "/admin/runs/run/", {"action": "delete_selected", "_selected_action": selected}
    )
    assert "Are you sure" in confirm.content.decode()  # Django's confirmation page
    admin_client.post(
        "/admin/runs/run/",
        {"action": "delete_selected", "_selected_action": selected, "post": "yes"},
    )
    assert list(Run.objects.values_list("run_id", flat=True)) == ["b2"]
    assert set(Event.objects.values_list("run_id", flat=True)) == {runs["b2"].pk}
    assert not Artifact.objects.exists()


def test_the_delete_action_says_events_go_too(admin_client, runs):
    body = admin_client.get("/admin/runs/run/").content.decode()
    assert "Delete selected runs with their events" in body


def test_deleting_one_run_from_its_page_deletes_its_events(admin_client, runs):
    run = runs["b2"]
    admin_client.post(f"/admin/runs/run/{run.pk}/delete/", {"post": "yes"})
    assert not Run.objects.filter(pk=run.pk).exists()
    assert not Event.objects.filter(run_id=run.pk).exists()
    assert Event.objects.count() == 4


def test_a_runs_page_shows_its_artifacts_without_loading_them(admin_client, runs):
    Artifact.store(runs["a1"], "diff.patch", b"--- a\n+++ b\n", "text/x-diff")
    body = admin_client.get(f"/admin/runs/run/{runs['a1'].pk}/change/").content.decode()
    assert "diff.patch" in body and "text/x-diff" in body


def test_events_are_read_only(admin_client, runs):
    event = Event.objects.filter(run_id=runs["a1"].pk).first()
    changelist = admin_client.get(f"/admin/runs/event/?run__id__exact={runs['a1'].pk}")
    assert changelist.status_code == 200
    assert "run.begin" in changelist.content.decode()
    assert admin_client.get("/admin/runs/event/add/").status_code == 403
    page = admin_client.get(f"/admin/runs/event/{event.pk}/change/")
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    assert admin_client.post(f"/admin/runs/event/{event.pk}/change/", {}).status_code == 403
    assert admin_client.post(
        f"/admin/runs/event/{event.pk}/delete/", {"post": "yes"}
    ).status_code == (403)
    assert Event.objects.filter(pk=event.pk).exists()


def test_events_search_by_exact_run_id_and_name_prefix(admin_client, runs):
    body = admin_client.get("/admin/runs/event/?q=a1").content.decode()
    assert "run.begin" in body and "step" in body and "run.exit_clean" not in body
    body = admin_client.get("/admin/runs/event/?q=run.exit").content.decode()
    assert "run.exit_clean" in body and ">step<" not in body


def test_creating_a_project_shows_its_token_once(admin_client, db):
    response = admin_client.post(
        "/admin/runs/project/add/",
        {
            "name": "Gas Town",
            "slug": "gas-town",
            "allowed_origins": "",
            "retention_runs_per_slug": 20,
            "retention_max_age_days": 30,
            "tokens-TOTAL_FORMS": 0,
            "tokens-INITIAL_FORMS": 0,
        },
        follow=True,
    )
    texts = [str(m) for m in get_messages(response.wsgi_request)]
    shown = [t for t in texts if "Ingest token for Gas Town" in t]
    assert len(shown) == 1
    token = re.search(r"(rl_[\w-]+)$", shown[0]).group(1)
    project = Project.objects.get(slug="gas-town")
    assert Project.for_token(token) == project
    again = admin_client.get(f"/admin/runs/project/{project.pk}/change/").content.decode()
    assert token not in again  # only the prefix is kept


def test_rotating_a_token_revokes_the_old_one(admin_client, project, token):
    response = admin_client.post(
        "/admin/runs/project/",
        {"action": "rotate_token", "_selected_action": [project.pk]},
        follow=True,
    )
    new = re.search(r"New token for Acme agents: (rl_[\w-]+)", response.content.decode()).group(1)
    assert Project.for_token(token) is None and Project.for_token(new) == project


def test_reenqueue_sends_a_failed_batch_back_to_the_worker(
    admin_client, client, token, django_capture_on_commit_callbacks
):
    response = client.post(
        "/api/ingest/events?run_id=late",
        ndjson(record("run.begin"), record("tool.ok")),
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )  # no on-commit hook ran: the batch is still pending
    batch = IngestBatch.objects.get(pk=response.json()["batch"])
    IngestBatch.objects.filter(pk=batch.pk).update(state="failed", attempts=5, error="boom")
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post(
            "/admin/telemetry/ingestbatch/",
            {"action": "reenqueue", "_selected_action": [batch.pk]},
            follow=True,
        )
    assert "1 batch(es) enqueued." in page.content.decode()
    batch.refresh_from_db()
    assert batch.state == "done"
    assert Event.objects.filter(run__run_id="late").count() == 2


def test_reenqueue_leaves_done_batches_alone(
    admin_client, post_events, django_capture_on_commit_callbacks
):
    post_events(ndjson(record("run.begin")), run_id="r")
    batch = IngestBatch.objects.get()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        page = admin_client.post(
            "/admin/telemetry/ingestbatch/",
            {"action": "reenqueue", "_selected_action": [batch.pk]},
            follow=True,
        )
    assert "0 batch(es) enqueued; 1 already done, left alone." in page.content.decode()
    assert callbacks == []
    assert Event.objects.count() == 1


def test_spans_are_listed_read_only_and_found_by_trace_id(admin_client, project):
    from datetime import UTC, datetime

    from telemetry.models import Span

    at = datetime(2026, 4, 21, 5, 12, tzinfo=UTC)
    span = Span.objects.create(
        project=project,
        trace_id="ab" * 16,
        span_id="cd" * 8,
        name="<script>bd.call</script>",
        start_time=at,
        end_time=at,
        duration_ms=0,
    )
    listing = admin_client.get(f"/admin/telemetry/span/?q={'ab' * 16}").content.decode()
    assert "&lt;script&gt;bd.call&lt;/script&gt;" in listing and "<script>bd.call" not in listing
    assert admin_client.get("/admin/telemetry/span/add/").status_code == 403
    page = admin_client.get(f"/admin/telemetry/span/{span.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content
