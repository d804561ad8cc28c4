"""The operator pages of Sentry events: the group page, the DSN set-up page, /status.

Events are made by the real `sentry-sdk` with a transport that keeps the envelopes
offline, then stored with the ORM in the shape the receiver writes (docs/errors.md),
so these tests hold the pages to what SDKs send, independently of the receiver.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
import sentry_sdk
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from django.utils.module_loading import import_string
from sentry_sdk.transport import Transport

from runs.models import Project, Run
from telemetry import views
from telemetry.errors import Occurrence, store
from telemetry.models import EnvelopeItemCount, ErrorGroup, ErrorReport

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
ESCAPED = "&lt;script&gt;window.__pwned=1&lt;/script&gt;"


class Capture(Transport):
    """Keeps the `event` items an SDK would send; nothing leaves the process."""

    events: list[dict] = []

    def capture_envelope(self, envelope) -> None:
        for item in envelope.items:
            if item.type == "event":
                Capture.events.append(item.payload.json)


def sdk_event(raise_it, **scope) -> dict:
    """The event the Python SDK makes of the exception `raise_it()` raises."""
    Capture.events = []
    sentry_sdk.init(
        dsn="http://public@localhost/1",
        transport=Capture,
        default_integrations=False,
        release=scope.pop("release", "agent@1.4.2"),
        environment=scope.pop("environment", "production"),
        include_local_variables=True,
    )
    try:
        with sentry_sdk.new_scope() as s:
            for key, value in scope.pop("tags", {}).items():
                s.set_tag(key, value)
            if "user" in scope:
                s.set_user(scope.pop("user"))
            for crumb in scope.pop("breadcrumbs", []):
                sentry_sdk.add_breadcrumb(**crumb)
            for key, value in scope.pop("extra", {}).items():
                s.set_extra(key, value)
            try:
                raise_it()
            except Exception:
                sentry_sdk.capture_exception()
        sentry_sdk.flush()
    finally:
        # No SDK stays set up for the tests that follow.
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    (event,) = Capture.events
    return event


def load_plugin(name: str) -> None:
    """Application code that fails inside a library (Django's import_string): a
    chain whose newest exception has in-app frames and library frames."""
    try:
        import_string(name)
    except ImportError as exc:
        raise RuntimeError(f"plugin {name} failed to load") from exc


def stored(project, event: dict, *, group: ErrorGroup | None = None, at=None, run=None):
    """An ErrorReport as the receiver stores a Sentry event (and its group)."""
    at = at or timezone.now()
    exception = event.get("exception")
    values = exception.get("values") if isinstance(exception, dict) else None
    newest = values[-1] if isinstance(values, list) and values else {}
    newest = newest if isinstance(newest, dict) else {}
    title = f"{newest.get('type')}: {newest.get('value')}" if newest else event.get("message", "")
    # One event id per stored event (the receiver keeps a resent one once).
    event = {**event, "event_id": uuid.uuid4().hex}
    if group is None:
        group = ErrorGroup.objects.create(
            project=project,
            fingerprint=f"fp-{ErrorGroup.objects.count()}",
            title=title[:255],
            culprit="load_plugin",
            source="sentry",
            first_seen=at,
            last_seen=at,
        )
    ErrorGroup.objects.filter(pk=group.pk).update(count=group.count + 1, last_seen=at)
    group.count += 1
    return ErrorReport.objects.create(
        group=group,
        project=project,
        source="sentry",
        level="error",
        event_id=event.get("event_id", ""),
        release=str(event.get("release", ""))[:200],
        environment=str(event.get("environment", ""))[:64],
        message=title,
        error=title,
        run=run,
        received_at=at,
        event=event,
    )


@pytest.fixture
def chained(project) -> ErrorReport:
    event = sdk_event(
        lambda: load_plugin("plugins.nope.Thing"),
        tags={"run_id": "run-7", "repo": "owner/repo"},
        user={"id": "u-1", "email": "dev@example.com", "username": "dev"},
        breadcrumbs=[
            {"category": "http", "message": "GET /api/x", "data": {"status": 502}},
            {"category": "query", "message": "SELECT 1", "level": "info"},
        ],
        extra={"attempt": 3, "payload": {"a": [1, 2]}},
    )
    event["request"] = {
        "method": "POST",
        "url": "https://app.example.com/hook",
        "query_string": "a=1&b=2",
        "headers": {"User-Agent": "curl/8", "Content-Type": "application/json"},
        "data": {"pr": 12},
    }
    return stored(project, event)


def html(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.content.decode()


# --- The group page ----------------------------------------------------------------


def test_it_shows_the_exception_chain_newest_first_with_in_app_frames_first(
    operator_client, chained
):
    body = html(operator_client.get(f"/errors/{chained.group_id}"))
    runtime, imports = body.index("RuntimeError"), body.index("ModuleNotFoundError")
    assert runtime < imports  # the newest exception (raised last) first
    assert "plugin plugins.nope.Thing failed to load" in body
    # `file:line in function`, the crashing frame first, with its source lines.
    assert re.search(r'<code class="where">tests/test_sentry_pages.py:\d+</code> in <code', body)
    assert '<code class="function">load_plugin</code>' in body
    assert '<tr class="current"><td class="num">' in body
    assert "raise RuntimeError(f&quot;plugin {name} failed to load&quot;) from exc" in body
    # Django's frames (a library) wait behind the toggle; the app's are up front.
    chain = views.exception_chain(chained.event)
    assert [e.type for e in chain] == ["RuntimeError", "ModuleNotFoundError"]
    older = chain[1]
    assert older.split and older.frames[-1].function != older.frames[0].function
    django = [f for f in older.frames if f.file.startswith("django/")]
    assert django and not any(f.in_app for f in django) and older.app_frames
    assert '<details class="full-stack"><summary>Full stack trace:' in body
    assert "(library)" in body


def test_it_shows_tags_user_release_environment_breadcrumbs_request_contexts_extra_and_sdk(
    operator_client, chained
):
    body = html(operator_client.get(f"/errors/{chained.group_id}"))
    for expected in (
        "<code>agent@1.4.2</code>",  # release
        "<dd>production</dd>",  # environment
        '<th scope="row">run_id</th><td>run-7</td>',  # a tag
        '<th scope="row">email</th><td>dev@example.com</td>',  # the user
        "GET /api/x",  # a breadcrumb, with its data
        "{&quot;status&quot;:502}",
        "<code>POST https://app.example.com/hook</code>",  # the request
        "a=1&amp;b=2",
        '<th scope="row">User-Agent</th><td>curl/8</td>',
        '<th scope="row">attempt</th><td>3</td>',  # extra
        "<code>sentry.python 2.75.0</code>".replace("2.75.0", sentry_sdk.VERSION),
        "<h3>trace</h3>",  # contexts
        f"<code>{chained.event_id}</code>",
    ):
        assert expected in body, expected
    trace_id = chained.event["contexts"]["trace"]["trace_id"]
    assert f'href="/traces/{trace_id}"' in body


def test_it_steps_through_the_events_of_the_group_with_plain_links(operator_client, project):
    now = timezone.now()
    first = stored(project, sdk_event(lambda: load_plugin("a.b"), release="v1"), at=now)
    group = first.group
    second = stored(
        project, sdk_event(lambda: load_plugin("a.b"), release="v2"), group=group, at=now
    )
    third = stored(
        project,
        sdk_event(lambda: load_plugin("a.b"), release="v3", environment="staging"),
        group=group,
        at=now + timedelta(seconds=1),
    )
    url = f"/errors/{group.id}"
    newest = html(operator_client.get(url))
    assert "Latest event" in newest and "<code>v3</code>" in newest
    assert f'href="?event={second.pk}" rel="next"' in newest  # same time: by id
    middle = html(operator_client.get(f"{url}?event={second.pk}"))
    assert f'href="?event={third.pk}" rel="prev"' in middle
    assert f'href="?event={first.pk}" rel="next"' in middle
    assert f'href="{url}">Newest</a>' in middle
    oldest = html(operator_client.get(f"{url}?event={first.pk}"))
    assert '<span class="hint">Older ›</span>' in oldest and "<code>v1</code>" in oldest
    # Another group's event, a pruned one or a bad id: the newest, said so.
    other = stored(project, sdk_event(lambda: load_plugin("c.d")))
    for wanted in (other.pk, 999999, "x'<"):
        body = html(operator_client.get(url, {"event": wanted}))
        assert "no longer kept" in body and "Latest event" in body


def test_it_counts_the_group_s_events_by_release_and_environment_in_fixed_queries(
    operator_client, project, django_assert_num_queries
):
    event = sdk_event(lambda: load_plugin("a.b"))
    group = None
    for i in range(12):
        event = {**event, "release": f"v{i % 3}", "environment": ("prod", "dev")[i % 2]}
        group = stored(project, event, group=group).group
    # session, user, group, affected, histogram, 20 reports, newer, older,
    # releases, environments: however many events and releases.
    with django_assert_num_queries(10):
        body = html(operator_client.get(f"/errors/{group.id}"))
    releases = body[body.index('id="releases-title"') : body.index('id="environments-title"')]
    assert re.findall(r"<code>(v\d)</code></td><td class=\"num\">(\d+)", releases) == [
        ("v0", "4"),
        ("v1", "4"),
        ("v2", "4"),
    ]
    environments = body[body.index('id="environments-title"') :]
    assert '<code>dev</code></td><td class="num">6' in environments


def test_beacon_groups_keep_their_page(operator_client, project):
    store(project, [Occurrence(source="frontend", message="disk full")])
    group = ErrorGroup.objects.get()
    body = html(operator_client.get(f"/errors/{group.id}"))
    assert "Recent occurrences" in body and "Breadcrumbs" not in body


def test_triage_works_on_the_sentry_group_page(operator_client, chained):
    url = f"/errors/{chained.group_id}/status"
    response = operator_client.post(url, {"status": "resolved"}, HTTP_HX_REQUEST="true")
    assert html(response).lstrip().startswith('<div id="group-status"')
    assert ErrorGroup.objects.get(pk=chained.group_id).status == "resolved"


def hostile_event() -> dict:
    """XSS payloads in every field a client controls, keys included."""
    frame = {
        "filename": XSS,
        "function": XSS,
        "module": XSS,
        "lineno": 3,
        "in_app": True,
        "pre_context": [XSS],
        "context_line": XSS,
        "post_context": [XSS],
        "vars": {XSS: XSS},
    }
    return {
        "event_id": "a" * 32,
        "message": XSS,
        "logentry": {"message": XSS, "formatted": XSS},
        "exception": {
            "values": [
                {
                    "type": XSS,
                    "value": XSS,
                    "module": XSS,
                    "mechanism": {"type": XSS, "handled": False},
                    "stacktrace": {"frames": [{**frame, "in_app": False}, frame]},
                }
            ]
        },
        "release": XSS,
        "environment": XSS,
        "platform": XSS,
        "logger": XSS,
        "transaction": XSS,
        "server_name": XSS,
        "fingerprint": [XSS],
        "tags": {XSS: XSS},
        "user": {"id": XSS, XSS: XSS, "email": XSS},
        "request": {
            "method": XSS,
            "url": "javascript:alert(1)//" + XSS,
            "headers": {XSS: XSS, "Referer": "javascript:alert(1)"},
            "query_string": [[XSS, XSS]],
            "data": XSS,
            "env": {XSS: XSS},
        },
        "contexts": {XSS: {XSS: XSS}, "trace": {"trace_id": XSS}},
        "breadcrumbs": {
            "values": [
                {
                    "timestamp": XSS,
                    "type": XSS,
                    "category": XSS,
                    "level": XSS,
                    "message": XSS,
                    "data": {XSS: XSS},
                }
            ]
        },
        "extra": {XSS: XSS, "nested": {XSS: [XSS]}},
        "sdk": {"name": XSS, "version": XSS, "integrations": [XSS]},
    }


def test_everything_a_client_sent_is_shown_as_text(operator_client, project):
    report = stored(project, hostile_event())
    run = Run.objects.create(project=project, run_id=XSS, slug="o__r")
    ErrorReport.objects.filter(pk=report.pk).update(run=run)
    body = html(operator_client.get(f"/errors/{report.group_id}"))
    assert "<script>window" not in body and "<img src=x" not in body
    assert body.count(ESCAPED) > 30
    assert "javascript:" not in re.sub(r">[^<]*<", "><", body)  # never in an attribute
    # No inline script or style: the CSP would block them anyway.
    assert "style=" not in body
    assert not re.search(r"<script(?![^>]*\bsrc=)", body)


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"exception": []},
        {"exception": {"values": [None, "x", {"stacktrace": {"frames": [None, 3]}}]}},
        {"exception": {"values": [{"stacktrace": {"frames": [{"lineno": "12a", "vars": []}]}}]}},
        {"tags": [["k", "v"], ["only-one"]], "user": "not a dict", "request": {"headers": 7}},
        {"breadcrumbs": [{"timestamp": 1.7e9, "message": 1}], "contexts": {"os": "linux"}},
        {"breadcrumbs": {"values": [{"timestamp": 1e300}]}, "sdk": ["x"], "extra": None},
        {"exception": {"values": [{"stacktrace": {"frames": [{"context_line": "x"}]}}]}},
    ],
)
def test_odd_shapes_of_an_event_never_break_the_page(operator_client, project, event):
    report = stored(project, {"message": "odd", **event})
    html(operator_client.get(f"/errors/{report.group_id}"))


def test_the_run_page_lists_the_sentry_events_of_the_run(operator_client, project, chained):
    run = Run.objects.create(project=project, run_id="run-7", slug="o__r")
    ErrorReport.objects.filter(pk=chained.pk).update(run=run)
    assert run.errors_count == 0  # a Sentry event is no error *event* of the run
    body = html(operator_client.get("/runs/run-7"))
    section = body[body.index('id="run-errors"') :]
    assert f'href="/errors/{chained.group_id}"' in section[: section.index("</section>")]


# --- DSN set-up ----------------------------------------------------------------------


def test_the_projects_page_gives_each_dsn_with_set_up_snippets(operator_client, project, settings):
    settings.RUNLENS_URL = "https://runlens.example.com"
    Project.objects.create(name=XSS, slug="web", allowed_origins="https://app.example.com")
    body = html(operator_client.get("/projects/"))
    dsn = f"https://{project.public_key}@runlens.example.com/{project.pk}"
    assert project.dsn == dsn and f'<code class="dsn">{dsn}</code>' in body
    for snippet in (
        f'sentry_sdk.init(\n    dsn="{dsn}",',  # Python
        "@sentry/node",
        "@sentry/browser",
        f"https://runlens.example.com/api/{project.pk}/store/",  # the seed's bash client
        f"X-Sentry-Auth: Sentry sentry_key={project.public_key}, sentry_version=7",
    ):
        assert snippet in body, snippet
    assert "No allowed origins" in body and "https://app.example.com" in body
    assert ESCAPED in body and "<script>window" not in body
    assert 'href="/projects/"' in html(operator_client.get("/errors"))


def test_the_projects_page_needs_a_login(client, project):
    response = client.get("/projects/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_admin_shows_a_project_s_dsn_read_only(db, project):
    admin = Client()
    admin.force_login(User.objects.create_superuser("root", "", "pw-123456789"))
    body = html(admin.get(f"/admin/runs/project/{project.pk}/change/"))
    assert project.dsn in body
    assert 'name="dsn"' not in body


# --- /status -----------------------------------------------------------------------------


def test_status_shows_the_skipped_envelope_items_or_one_line_when_none(operator_client, project):
    assert "No Sentry envelope item was skipped." in html(operator_client.get("/status"))
    EnvelopeItemCount.objects.create(project=project, item_type="session", count=1200)
    other = Project.objects.create(name="Other", slug="other")
    EnvelopeItemCount.objects.create(project=other, item_type="session", count=30)
    EnvelopeItemCount.objects.create(project=project, item_type=XSS[:64], count=2)
    body = html(operator_client.get("/status"))
    assert re.search(r"<code>session</code></td>\s*<td class=\"num\">1,230</td>", body)
    assert ESCAPED.split("window")[0] in body and "<script>window" not in body


# --- In a real browser ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_in_a_real_browser_no_payload_runs_and_the_toggles_work(live_server, browser):
    project = Project.objects.create(name="Agents", slug="agents")
    report = stored(project, hostile_event())
    real = sdk_event(lambda: load_plugin("plugins.nope.Thing"))
    real_report = stored(project, real)
    User.objects.create_user("alice", password="correct horse battery")

    page = browser.new_page()
    dialogs: list[str] = []
    console_errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
    page.goto(f"{live_server.url}/login/?next=/errors/{report.group_id}")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "correct horse battery")
    page.click("button[type=submit]")
    page.wait_for_url(f"**/errors/{report.group_id}")
    assert XSS in page.locator("h1.error-title").inner_text()
    assert XSS in page.locator("table.breadcrumbs").inner_text()
    assert page.locator("main img, main script").count() == 0

    page.goto(f"{live_server.url}/errors/{real_report.group_id}")
    full = page.locator("details.full-stack").last
    assert not full.locator("li.frame.library").first.is_visible()
    full.locator("> summary").click()
    assert full.locator("li.frame.library").first.is_visible()

    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert not [m for m in console_errors if "Content Security Policy" in m], console_errors
