"""Error grouping, regression, triage, the errors pages, the admin and report retention."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, override_settings
from django.utils import timezone

from runs.models import Run
from telemetry import retention
from telemetry.errors import (
    Occurrence,
    normalize_message,
    parse_stack,
    record_event_errors,
    store,
    top_frame,
)
from telemetry.models import ErrorGroup, ErrorReport
from tests.conftest import ndjson, record

V8_STACK = """TypeError: Cannot read properties of undefined (reading 'id')
    at renderUser (https://app.example.com/static/app.3f9a2c1b.js?v=7:120:17)
    at Array.map (<anonymous>)
    at HTMLButtonElement.onClick (https://app.example.com/node_modules/react-dom/index.js:1:2)"""

GECKO_STACK = """renderUser@https://app.example.com/static/app.js:120:17
@https://app.example.com/static/app.js:3:1"""

PY_STACK = """Traceback (most recent call last):
  File "/srv/agent/loop.py", line 88, in step
    reply = client.send(request)
  File "/usr/lib/python3.11/site-packages/httpx/_client.py", line 901, in send
    raise exc
httpx.ConnectError: [Errno 111] Connection refused"""


def occurrence(message: str = "", error: str = "", stack: str = "", **fields) -> Occurrence:
    return Occurrence(source="frontend", message=message, error=error, stack=stack, **fields)


# --- Fingerprints -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("User 4213 not found", "User <n> not found"),
        ("took 1.5s, retried 3 times", "took <n>s, retried <n> times"),
        ("job 550e8400-e29b-41d4-a716-446655440000 failed", "job <uuid> failed"),
        ("pointer 0x7ffe12ab at chunk 3f9a2c1bde", "pointer <hex> at chunk <hex>"),
        (
            "Cannot read properties of undefined (reading 'id')",
            "Cannot read properties of undefined (reading <str>)",
        ),
        ('key "user:42" missing in `cache`', "key <str> missing in <str>"),
        (
            "GET https://api.example.com/v1/items?page=2&token=abc failed",
            "GET https://api.example.com/v1/items?<query> failed",
        ),
        ("deadline at 2026-04-21T05:12:34.123Z passed", "deadline at <ts> passed"),
        ("utf8 decode error in h1", "utf8 decode error in h1"),
    ],
)
def test_variable_parts_of_messages_are_normalised(text, expected):
    assert normalize_message(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        # Other ids, values, builds and query strings: the same bug.
        (dict(message="User 12 not found"), dict(message="User 9999 not found")),
        (
            dict(
                error="TypeError: Cannot read properties of undefined (reading 'id')",
                stack=V8_STACK,
            ),
            dict(
                error="TypeError: Cannot read properties of undefined (reading 'name')",
                stack=V8_STACK.replace("3f9a2c1b", "77e0d1aa").replace("120:17", "131:4"),
            ),
        ),
        (
            dict(
                message="Uncaught TypeError: x is null", stack="    at f (https://a/x.js?v=1:1:1)"
            ),
            dict(error="TypeError: x is null", stack="    at f (https://a/x.js?v=2:9:9)"),
        ),
    ],
)
def test_one_bug_with_other_values_is_one_fingerprint(a, b):
    assert occurrence(**a).fingerprint == occurrence(**b).fingerprint


@pytest.mark.parametrize(
    "a, b",
    [
        (dict(error="TypeError: x is null"), dict(error="RangeError: x is null")),
        (dict(message="disk full"), dict(message="disk quota exceeded")),
        (
            dict(error="TypeError: x is null", stack="    at render (https://a/app.js:1:1)"),
            dict(error="TypeError: x is null", stack="    at save (https://a/app.js:1:1)"),
        ),
    ],
)
def test_other_types_messages_or_crash_sites_are_other_fingerprints(a, b):
    assert occurrence(**a).fingerprint != occurrence(**b).fingerprint


def test_stacks_are_parsed_innermost_first_and_libraries_are_not_in_app():
    v8 = parse_stack(V8_STACK)
    assert [(f.function, f.location, f.line, f.in_app) for f in v8] == [
        ("renderUser", "/static/app.3f9a2c1b.js", 120, True),
        ("Array.map", "<anonymous>", None, False),
        ("HTMLButtonElement.onClick", "/node_modules/react-dom/index.js", 1, False),
    ]
    gecko = parse_stack(GECKO_STACK)
    assert [(f.function, f.location, f.line, f.column) for f in gecko] == [
        ("renderUser", "/static/app.js", 120, 17),
        ("?", "/static/app.js", 3, 1),
    ]
    python = parse_stack(PY_STACK)
    assert [(f.function, f.in_app) for f in python] == [("send", False), ("step", True)]
    assert top_frame(python).function == "step"


def test_title_and_culprit_come_from_the_type_message_and_top_in_app_frame():
    occ = occurrence(message="Uncaught TypeError: boom", stack=V8_STACK)
    assert occ.type == "TypeError"
    assert occ.title == "TypeError: boom"
    assert occ.culprit == "renderUser (/static/app.3f9a2c1b.js)"
    python = occurrence(message="could not reach the model", stack=PY_STACK)
    assert python.title == "httpx.ConnectError: [Errno 111] Connection refused"
    assert python.culprit == "step (/srv/agent/loop.py)"


# --- Groups, regression, ignore -----------------------------------------------------


def test_reports_of_one_bug_share_a_group_that_counts_them(project):
    store(project, [occurrence(message=f"User {i} not found") for i in range(3)])
    store(project, [occurrence(message="User 77 not found")])
    group = ErrorGroup.objects.get()
    assert (group.count, group.status, group.title) == (4, "unresolved", "User 0 not found")
    assert ErrorReport.objects.filter(group=group).count() == 4
    assert group.first_seen <= group.last_seen


def test_groups_are_per_project(project, stranger):
    store(project, [occurrence(message="boom")])
    store(stranger[0], [occurrence(message="boom")])
    assert ErrorGroup.objects.count() == 2


def test_a_new_report_on_a_resolved_group_reopens_it_as_regressed(project, caplog):
    store(project, [occurrence(message="boom")])
    group = ErrorGroup.objects.get()
    group.set_status(ErrorGroup.Status.RESOLVED)
    assert group.resolved_at is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runlens.alerts"):
        store(project, [occurrence(message="boom")])
    group.refresh_from_db()
    assert (group.status, group.regressed, group.count, group.resolved_at) == (
        "unresolved",
        True,
        2,
        None,
    )
    assert [r.getMessage() for r in caplog.records] == ["error group regressed: boom"]


def test_ignored_groups_keep_counting_but_never_alert_or_reopen(project, caplog):
    store(project, [occurrence(message="noise")])
    ErrorGroup.objects.all().set_status(ErrorGroup.Status.IGNORED)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runlens.alerts"):
        store(project, [occurrence(message="noise")] * 3)
    group = ErrorGroup.objects.get()
    assert (group.status, group.regressed, group.count) == ("ignored", False, 4)
    assert caplog.records == []


def test_a_new_group_alerts_once(project, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.alerts"):
        store(project, [occurrence(message="first")])
        store(project, [occurrence(message="first")])
    assert [r.getMessage() for r in caplog.records] == ["new error group: first"]


def test_storing_many_reports_takes_two_queries(project, django_assert_num_queries):
    many = [occurrence(message=f"bug {i % 3} at {i}") for i in range(100)]
    with django_assert_num_queries(2):
        store(project, many)
    assert ErrorGroup.objects.count() == 1  # "bug <n> at <n>"
    assert ErrorGroup.objects.get().count == 100


def test_a_burst_counts_fully_but_keeps_a_sample_of_reports(project):
    store(project, [occurrence(message="flood")] * 500)
    group = ErrorGroup.objects.get()
    assert group.count == 500
    assert ErrorReport.objects.count() == 50


# --- From agent events ------------------------------------------------------------


def test_error_level_events_and_crashes_become_reports_linked_to_their_run(post_events):
    response = post_events(
        ndjson(
            record("run.begin"),
            record("tool.call", data={"tool": "bash"}),
            record(
                "tool.error",
                level="error",
                message="command exited with 127",
                data={"error": "ValueError: bad path /tmp/x1", "stack": PY_STACK},
            ),
            record("llm.error", level="error", message="rate limited for 30s"),
            record("run.crashed", data={"exit_code": 137}),
        ),
        run_id="crashy",
        **{"X-Request-ID": "req-events-0001"},
    )
    assert response.status_code == 202
    run = Run.objects.get(run_id="crashy")
    reports = ErrorReport.objects.select_related("group").order_by("event_seq")
    assert [(r.source, r.run_id, r.event_seq) for r in reports] == [
        ("event", run.pk, 3),
        ("event", run.pk, 4),
        ("event", run.pk, 5),
    ]
    assert [r.group.title for r in reports] == [
        "ValueError: bad path /tmp/x1",
        "llm.error: rate limited for 30s",
        "run.crashed: run crashed with exit code 137",
    ]
    assert reports[0].group.culprit == "step (/srv/agent/loop.py)"
    assert {r.request_id for r in reports} == {"req-events-0001"}
    assert reports[0].context["data"]["stack"] == PY_STACK


def test_event_errors_are_grouped_set_based(project, post_events, django_assert_max_num_queries):
    from telemetry.ingest.records import parse_body

    body = ndjson(
        record("run.begin"),
        *[record("tool.error", level="error", message=f"exit {i}") for i in range(200)],
    )
    post_events(body, run_id="r1")
    pairs, _, _ = parse_body(body, "r1")
    records = [rec for _, rec in pairs]
    for rec in records:
        rec.run = Run.objects.get(run_id="r1")
    with django_assert_max_num_queries(2):
        assert record_event_errors(project, records) == 200
    assert ErrorGroup.objects.get().count == 400


# --- Pages ---------------------------------------------------------------------

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def groups(project):
    run = Run.objects.create(project=project, run_id="run/with slash", slug="o__r")
    store(
        project,
        [
            occurrence(
                message=f"Uncaught TypeError: {XSS}",
                error=f"TypeError: {XSS}",
                stack=V8_STACK,
                context={"url": "https://app.example.com/p?q=1", "ua": "Firefox", "build": XSS},
                url="https://app.example.com/p",
                visitor="v1",
                request_id="req-page-0001",
                run_id=run.pk,
            ),
            occurrence(message="disk full", visitor="v2"),
        ],
    )
    return {g.title.split(":")[0]: g for g in ErrorGroup.objects.all()}


def test_error_pages_need_a_login(client, groups):
    group = groups["TypeError"]
    for url in ("/errors", f"/errors/{group.id}"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert client.post(f"/errors/{group.id}/status", {"status": "resolved"}).status_code == 302
    assert ErrorGroup.objects.get(pk=group.id).status == "unresolved"


def test_the_list_shows_groups_with_counts_histogram_and_filters(operator_client, groups):
    page = operator_client.get("/errors")
    assert page.status_code == 200
    html = page.content.decode()
    assert "disk full" in html and "renderUser (/static/app.3f9a2c1b.js)" in html
    assert 'class="spark-bar"' in html
    assert "1 user · 1 URL" in html
    groups["TypeError"].set_status("resolved")
    assert "renderUser" not in operator_client.get("/errors").content.decode()
    assert "renderUser" in operator_client.get("/errors?status=resolved").content.decode()
    assert "disk full" not in operator_client.get("/errors?q=TypeError").content.decode()
    assert operator_client.get("/errors?status=bogus").status_code == 200


def test_an_htmx_request_gets_only_the_groups_fragment(operator_client, groups):
    response = operator_client.get("/errors?q=disk", HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="groups">')
    assert "<html" not in html and "disk full" in html
    assert "HX-Request" in response["Vary"]
    restore = operator_client.get(
        "/errors?q=disk", HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true"
    )
    assert "<html" in restore.content.decode()


def test_the_detail_shows_frames_context_occurrences_run_and_request_id(operator_client, groups):
    group = groups["TypeError"]
    html = operator_client.get(f"/errors/{group.id}").content.decode()
    assert "<code>renderUser</code>" in html and "<code>/static/app.3f9a2c1b.js</code>" in html
    assert '<tr class="library">' in html
    assert "req-page-0001" in html
    assert 'href="/runs/run/with%20slash?project=acme"' in html  # its project's run
    assert "https://app.example.com/p?q=1" in html  # the context, as sent, as text
    assert operator_client.get("/errors/999999").status_code == 404


def test_attacker_controlled_text_is_escaped_everywhere(operator_client, groups):
    group = groups["TypeError"]
    for url in ("/errors", f"/errors/{group.id}"):
        html = operator_client.get(url).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
        # No inline script or style anywhere: the CSP would block them.
        assert "style=" not in html
        assert not re.search(r"<script(?![^>]*\bsrc=)", html)


def test_triage_buttons_post_with_csrf_and_swap_the_status_block(operator, groups):
    group = groups["TypeError"]
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    page = client.get(f"/errors/{group.id}")
    token = page.cookies["csrftoken"].value
    assert f'hx-post="/errors/{group.id}/status"' in page.content.decode()
    url = f"/errors/{group.id}/status"
    assert client.post(url, {"status": "resolved"}, HTTP_HX_REQUEST="true").status_code == 403
    response = client.post(
        url, {"status": "resolved"}, HTTP_HX_REQUEST="true", HTTP_X_CSRFTOKEN=token
    )
    assert response.status_code == 200
    assert response.content.decode().lstrip().startswith('<div id="group-status"')
    assert ErrorGroup.objects.get(pk=group.id).status == "resolved"
    # Without JavaScript: a form post and a redirect back.
    response = client.post(url, {"status": "ignored", "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == f"/errors/{group.id}"
    assert ErrorGroup.objects.get(pk=group.id).status == "ignored"
    response = client.post(url, {"status": "unresolved"}, HTTP_X_CSRFTOKEN=token)
    assert ErrorGroup.objects.get(pk=group.id).status == "unresolved"
    assert client.post(url, {"status": "gone"}, HTTP_X_CSRFTOKEN=token).status_code == 400


def test_pages_query_a_fixed_number_of_times(operator_client, project, django_assert_num_queries):
    for i in range(30):
        store(project, [occurrence(message=f"bug {'x' * (i + 1)}")])
    # session, user, count, groups (with projects), affected, histogram
    with django_assert_num_queries(6):
        assert operator_client.get("/errors").status_code == 200


# --- Admin ---------------------------------------------------------------------


@pytest.fixture
def admin_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "", "pw-123456789"))
    return client


def test_the_admin_resolves_ignores_and_reopens_groups(admin_client, groups):
    ids = [g.pk for g in groups.values()]
    for action, status in (
        ("resolve", "resolved"),
        ("ignore", "ignored"),
        ("reopen", "unresolved"),
    ):
        response = admin_client.post(
            "/admin/telemetry/errorgroup/", {"action": action, "_selected_action": ids}
        )
        assert response.status_code == 302
        assert set(ErrorGroup.objects.values_list("status", flat=True)) == {status}
    listing = admin_client.get("/admin/telemetry/errorgroup/?status__exact=unresolved&q=disk")
    assert listing.status_code == 200 and b"disk full" in listing.content


def test_error_reports_are_read_only_in_the_admin(admin_client, groups):
    report = ErrorReport.objects.first()
    assert admin_client.get("/admin/telemetry/errorreport/").status_code == 200
    page = admin_client.get(f"/admin/telemetry/errorreport/{report.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert admin_client.get("/admin/telemetry/errorreport/add/").status_code == 403
    admin_client.post(f"/admin/telemetry/errorreport/{report.pk}/change/", {"message": "x"})
    assert ErrorReport.objects.get(pk=report.pk).message == report.message


# --- Retention -------------------------------------------------------------------


@override_settings(ERROR_REPORT_MAX_AGE_DAYS=7, ERROR_REPORTS_PER_GROUP=3)
def test_retention_drops_old_reports_and_caps_each_group(project):
    store(project, [occurrence(message="old one")])
    ErrorReport.objects.update(received_at=timezone.now() - timedelta(days=8))
    store(project, [occurrence(message="busy")] * 5)
    store(project, [occurrence(message="quiet")] * 2)
    newest_busy = list(
        ErrorReport.objects.filter(group__title="busy").order_by("-id").values_list("id", flat=True)
    )[:3]
    call_command("prune")
    kept = ErrorReport.objects.select_related("group")
    assert sorted(r.group.title for r in kept) == ["busy"] * 3 + ["quiet"] * 2
    assert sorted(r.id for r in kept if r.group.title == "busy") == sorted(newest_busy)
    # Groups stay, with their counts: the history of a bug outlives its samples.
    assert ErrorGroup.objects.get(title="old one").count == 1
    assert retention.prune_error_reports() == 0


def test_deleting_a_run_keeps_its_error_reports(project, groups):
    Run.objects.all().delete()
    assert ErrorReport.objects.filter(run__isnull=True).count() == 2
