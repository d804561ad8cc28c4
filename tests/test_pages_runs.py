"""Operator pages for runs: the list, a run with its timeline, compare.

Runs are made through the real ingest path (`post_events`), so the pages are
tested on what the worker really stores.
"""

from __future__ import annotations

import json
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.utils import timezone

from runs import views
from runs.models import Artifact, Run
from telemetry.models import ErrorReport
from telemetry.retention import prune_error_reports
from tests.conftest import ndjson, record

HX_TIMELINE = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "timeline"}
HX_POLL = {
    "HTTP_HX_REQUEST": "true",
    "HTTP_HX_TARGET": "timeline-next",
    "HTTP_HX_TRIGGER": "timeline-next",
}


def ts(second: int) -> str:
    return f"2026-04-21T05:{second // 60:02d}:{second % 60:02d}.000+00:00"


@pytest.fixture
def finished(post_events) -> Run:
    """A complete Gitoma-like run: phases, an LLM call, a commit, an error, a clean exit."""
    post_events(
        ndjson(
            record(
                "run.begin",
                ts(0),
                pid=4242,
                host="builder-1",
                data={"command": "run", "tags": ["nightly"], "work_rig": "rig-7"},
            ),
            record("phase.start", ts(1), data={"phase": "PLANNING"}),
            record(
                "llm.call",
                ts(2),
                phase="PLANNING",
                data={"model": "m", "tokens_in": 1200, "tokens_out": 300, "cost_usd": 0.42},
            ),
            record("phase.start", ts(12), data={"phase": "WORKING"}),
            record("git.commit", ts(20), phase="WORKING", data={"sha": "a1b2c3d"}),
            record("tool.failed", ts(21), phase="WORKING", level="error", message="boom"),
            record("run.exit_clean", ts(31), data={"exit_code": 0}),
        ),
        run_id="done-1",
    )
    return Run.objects.get(run_id="done-1")


@pytest.fixture
def live(post_events) -> Run:
    post_events(
        ndjson(
            record("run.begin", ts(0)),
            record("phase.start", ts(1), data={"phase": "WORKING"}),
        ),
        run_id="live-1",
    )
    return Run.objects.get(run_id="live-1")


def html(response) -> str:
    assert response.status_code in (200, 286), response.status_code
    return response.content.decode()


def table(body: str) -> str:
    """The runs table alone (the orphan banner names runs too)."""
    return (
        body[body.index('<table class="runs">') :].split("</table>")[0] if "<table" in body else ""
    )


def event_ids(body: str) -> list[str]:
    """The `e<seq>` ids of the timeline rows, in page order."""
    parser = _Collect()
    parser.feed(body)
    return [
        attrs["id"]
        for tag, attrs in parser.elements
        if tag == "li" and "event" in attrs.get("class", "")
    ]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))


# --- Permissions ------------------------------------------------------------------


def urls(finished: Run) -> list[str]:
    artifact = Artifact.store(finished, "notes.txt", b"hello", "text/plain")
    parent_pk = finished.pk
    return [
        "/",
        "/?status=running&q=x",
        "/runs/done-1",
        "/runs/done-1/events.jsonl",
        f"/compare/?run={parent_pk}&run={parent_pk}",
        f"/artifacts/{artifact.pk}/",
        f"/artifacts/{artifact.pk}/download",
    ]


def test_it_sends_anonymous_visitors_to_the_login_page(client, finished):
    for url in urls(finished):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url


def test_it_shows_every_page_to_a_logged_in_operator(operator_client, finished):
    for url in urls(finished):
        assert operator_client.get(url).status_code == 200, url


def test_it_answers_404_for_unknown_runs_and_artifacts(operator_client, db):
    for url in (
        "/runs/nope",
        "/runs/nope/events.jsonl",
        "/artifacts/999/",
        "/compare/?run=1&run=2",
    ):
        assert operator_client.get(url).status_code == 404, url


# --- Runs list --------------------------------------------------------------------


def test_it_lists_runs_newest_first_with_their_counters(operator_client, finished, live):
    body = html(operator_client.get("/"))
    assert body.index("live-1") < body.index("done-1")
    row = body[body.index(f'id="run-{finished.pk}"') :].split("</tr>")[0]
    assert "Succeeded" in row
    assert "31.0 s" in row  # duration
    assert ">7<" in row  # events
    assert "1,500" in row  # tokens
    assert "$0.4200" in row
    assert "<title>Runs" in body


def test_it_filters_by_project_slug_status_phase_time_and_text(
    operator_client, post_events, stranger
):
    post_events(
        ndjson(record("run.begin", ts(0), slug="a__x"), record("run.exit_clean")), run_id="x1"
    )
    post_events(ndjson(record("run.begin", ts(90), slug="a__y", phase="WORKING")), run_id="y1")
    post_events(ndjson(record("run.begin", ts(30), slug="b__z")), run_id="z1", auth=stranger[1])

    def shown(query: str) -> set[str]:
        body = table(html(operator_client.get(f"/?{query}")))
        return {rid for rid in ("x1", "y1", "z1") if f"<code>{rid}</code>" in body}

    assert shown("") == {"x1", "y1", "z1"}
    assert shown("project=stranger") == {"z1"}
    assert shown("slug=a__y") == {"y1"}
    assert shown("status=succeeded") == {"x1"}
    assert shown("phase=WORKING") == {"y1"}
    assert shown("since=2026-04-21T05:00:20") == {"y1", "z1"}
    assert shown("until=2026-04-21T05:00:20") == {"x1"}
    assert shown("q=Z") == {"z1"}
    assert shown("q=a__") == {"x1", "y1"}


def test_it_keeps_the_filters_in_the_form_so_the_url_can_be_shared(operator_client, finished):
    body = html(operator_client.get("/?slug=octocat__hello-world&status=succeeded&q=done"))
    assert 'name="slug" value="octocat__hello-world"' in body
    assert '<option value="succeeded" selected>' in body
    assert 'value="done"' in body
    assert 'method="get" action="/"' in body  # works without JavaScript too
    assert "Clear filters" in body


def test_it_ignores_a_bad_filter_value_and_says_so(operator_client, finished):
    body = html(operator_client.get("/?status=sleeping&since=yesterday&slug=octocat__hello-world"))
    assert "<code>done-1</code>" in body  # the good filter still applies
    assert "Ignored" in body and "status" in body and "since" in body


def test_odd_query_parameters_never_cause_an_error(operator_client, finished):
    for url in (
        "/?cursor=²",
        "/?before=-3",
        "/?cursor=99999999999999999999999",
        "/?since=2026-13-45",
        "/runs/done-1?after=¹",
        "/runs/done-1?level=loud&filter=" + "x" * 500,
        "/compare/?run=¹&run=2",
    ):
        assert operator_client.get(url).status_code == 200, url


def test_it_pages_with_a_keyset_cursor_both_ways(operator_client, post_events, monkeypatch):
    monkeypatch.setattr(views, "RUNS_PAGE", 2)
    post_events(ndjson(*(record("run.begin", ts(i), run_id=f"r{i}") for i in range(5))))
    ids = dict(Run.objects.values_list("run_id", "pk"))

    def page(query: str = "") -> list[str]:
        body = table(html(operator_client.get(f"/?{query}")))
        return [rid for rid in sorted(ids, reverse=True) if f"<code>{rid}</code>" in body]

    first = html(operator_client.get("/"))
    assert page() == ["r4", "r3"]
    assert f"cursor={ids['r3']}" in first and "Newer" not in first
    assert page(f"cursor={ids['r3']}") == ["r2", "r1"]
    assert page(f"cursor={ids['r1']}") == ["r0"]
    last = html(operator_client.get(f"/?cursor={ids['r1']}"))
    assert "Older" not in last and f"before={ids['r0']}" in last
    assert page(f"before={ids['r0']}") == ["r2", "r1"]
    assert page(f"before={ids['r2']}") == ["r4", "r3"]


def test_an_htmx_request_gets_only_the_runs_fragment(operator_client, finished):
    response = operator_client.get(
        "/?status=succeeded", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="runs"
    )
    body = html(response)
    assert body.lstrip().startswith('<section id="runs"')
    assert "<html" not in body and "run-filters" in body  # the poller includes the form
    assert 'hx-trigger="every 5s"' in body
    assert "<code>done-1</code>" in body
    assert "HX-Request" in response["Vary"]
    # The same request without htmx (a reload, a shared link) is the whole page.
    assert "<html" in html(operator_client.get("/?status=succeeded"))


def test_the_orphan_banner_lists_orphaned_runs_with_pid_and_heartbeat_age(
    operator_client, finished, live
):
    Run.objects.filter(pk=live.pk).update(
        status=Run.Status.ORPHANED,
        pid=31337,
        host="gpu-box",
        last_heartbeat=timezone.now() - timedelta(minutes=15),
        last_event_at=timezone.now() - timedelta(minutes=16),
    )
    body = html(operator_client.get("/"))
    banner = body[body.index('class="banner orphaned"') :].split("</div>")[0]
    assert "1 orphaned run" in banner
    assert "PID 31337 on gpu-box" in banner
    assert "heartbeat 15m ago" in banner
    assert 'href="/runs/live-1"' in banner
    assert "done-1" not in banner
    assert "(1 orphaned)" in body.split("</title>")[0]


def test_the_banner_also_shows_a_silent_run_before_beat_marks_it(operator_client, live):
    Run.objects.filter(pk=live.pk).update(
        last_heartbeat=None, last_event_at=timezone.now() - timedelta(minutes=5), started_at=None
    )
    assert 'class="banner orphaned"' in html(operator_client.get("/"))


def test_a_newcomer_sees_how_to_send_a_first_trace(operator_client, db):
    body = html(operator_client.get("/"))
    assert "No runs yet" in body
    assert "curl -X POST 'http://testserver/api/ingest/events?run_id=my-first-run'" in body
    assert "Authorization: Bearer &lt;your ingest token&gt;" in body
    assert '"event": "run.begin"' in body
    assert "python manage.py createproject" in body


def test_no_match_is_not_mistaken_for_no_runs(operator_client, finished):
    body = html(operator_client.get("/?slug=nothing-like-it"))
    assert "No runs match these filters" in body and "No runs yet" not in body


def test_a_page_of_100_runs_takes_a_bounded_number_of_queries(
    operator_client, post_events, django_assert_max_num_queries
):
    post_events(
        ndjson(
            *(
                record("run.begin", ts(i % 3600), run_id=f"bulk-{i}", slug=f"o__r{i % 7}")
                for i in range(100)
            )
        )
    )
    Run.objects.filter(run_id__in=["bulk-1", "bulk-2"]).update(status=Run.Status.ORPHANED)
    assert Run.objects.count() == 100
    with django_assert_max_num_queries(8):
        body = html(operator_client.get("/"))
    assert body.count('<tr class="st-') == 50
    with django_assert_max_num_queries(6):
        operator_client.get("/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="runs")


# --- One run ----------------------------------------------------------------------


def test_the_header_shows_what_an_operator_asks_first(operator_client, finished):
    body = html(operator_client.get("/runs/done-1"))
    summary = body[body.index('id="run-summary"') :].split("</section>")[0]
    for expected in (
        "Succeeded",
        "<dd>WORKING</dd>",  # phase
        "31.0 s",  # duration
        "<dd>0 · clean exit</dd>",  # exit code
        "1,200 / 300",  # tokens in / out
        "$0.4200",
        "builder-1 / 4242",  # host / pid
        "<li>nightly</li>",  # tags
        "<dt>work_rig</dt><dd>rig-7</dd>",  # attributes
    ):
        assert expected in summary, expected
    assert "<title>octocat__hello-world · done-1 · Succeeded · Runlens</title>" in body


def test_the_timeline_shows_events_in_order_with_level_and_formatted_data(
    operator_client, finished
):
    body = html(operator_client.get("/runs/done-1"))
    assert event_ids(body) == [f"e{i}" for i in range(1, 8)]
    error_row = body[body.index('id="e6"') :].split("</li>")[0]
    assert 'class="event lvl-error"' in error_row
    assert "05:00:21.000" in error_row and "tool.failed" in error_row and "boom" in error_row
    commit = body[body.index('id="e5"') :].split("</li>")[0]
    assert (
        "<details><summary>data</summary><pre>{\n  &quot;sha&quot;: &quot;a1b2c3d&quot;\n}</pre>"
        in (commit)
    )
    assert '<span class="phase">WORKING</span>' in commit


def test_namespace_chips_come_from_the_runs_own_event_names(operator_client, finished):
    body = html(operator_client.get("/runs/done-1"))
    chips = body[body.index('aria-label="Filter by namespace"') :].split("</nav>")[0]
    assert 'href="/runs/done-1?filter=phase."' in chips
    for prefix, count in (("phase.", 2), ("run.", 2), ("llm.", 1), ("git.", 1), ("tool.", 1)):
        assert f'{prefix} <span class="count">{count}</span>' in chips
    assert "pr." not in chips  # only namespaces the run has


def test_it_filters_the_timeline_by_namespace_and_level(operator_client, finished):
    assert event_ids(html(operator_client.get("/runs/done-1?filter=phase."))) == ["e2", "e4"]
    assert event_ids(html(operator_client.get("/runs/done-1?level=error"))) == ["e6"]
    assert event_ids(html(operator_client.get("/runs/done-1?filter=git.&level=warn"))) == []
    body = html(operator_client.get("/runs/done-1?filter=llm."))
    assert 'href="/runs/done-1?filter=llm." aria-current="true"' in body
    assert "No events match this filter" in html(operator_client.get("/runs/done-1?filter=x."))


def test_a_chip_request_from_htmx_gets_only_the_timeline_fragment(operator_client, finished):
    body = html(operator_client.get("/runs/done-1?filter=llm.", **HX_TIMELINE))
    assert body.lstrip().startswith('<section id="timeline"')
    assert "<html" not in body and 'id="run-summary"' not in body
    assert event_ids(body) == ["e3"]
    assert 'name="filter" value="llm."' in body  # what the live poller will send


def test_a_live_run_is_followed_and_polls_only_for_rows_after_its_cursor(
    operator_client, live, post_events
):
    body = html(operator_client.get("/runs/live-1"))
    assert 'hx-get="?after=2"' in body and 'hx-trigger="every 2s"' in body
    nothing_new = operator_client.get("/runs/live-1?after=2", **HX_POLL)
    assert nothing_new.status_code == 200
    assert event_ids(html(nothing_new)) == []
    assert 'hx-get="?after=2"' in html(nothing_new)

    post_events(ndjson(record("llm.call", ts(5)), record("git.commit", ts(6))), run_id="live-1")
    response = operator_client.get("/runs/live-1?after=2", **HX_POLL)
    body = html(response)
    assert response.status_code == 200
    assert event_ids(body) == ["e3", "e4"]
    assert "<html" not in body and 'id="timeline"' not in body
    assert 'hx-get="?after=4"' in body  # the new cursor
    assert (
        'id="run-summary" class="card summary" aria-labelledby="run-title" hx-swap-oob="true"'
        in (body)
    )


def test_the_poll_answers_286_with_the_last_rows_once_the_run_has_ended(
    operator_client, live, post_events
):
    post_events(ndjson(record("run.exit_clean", ts(9))), run_id="live-1")
    response = operator_client.get("/runs/live-1?after=2", **HX_POLL)
    assert response.status_code == 286
    body = response.content.decode()
    assert event_ids(body) == ["e3"]
    assert 'hx-trigger="every 2s"' not in body
    assert "Live follow ended: the run is succeeded." in body
    assert "Succeeded" in body  # the summary, swapped out of band
    # A finished run's page does not poll at all.
    assert "hx-trigger" not in html(operator_client.get("/runs/live-1")).split('id="events"')[1]


def test_the_poll_follows_the_filters_of_the_view(operator_client, live, post_events):
    post_events(ndjson(record("llm.call", ts(5)), record("git.commit", ts(6))), run_id="live-1")
    body = html(operator_client.get("/runs/live-1?after=2&filter=git.", **HX_POLL))
    assert event_ids(body) == ["e4"]


def test_a_live_run_opens_at_its_tail(operator_client, post_events, monkeypatch):
    monkeypatch.setattr(views, "TIMELINE_PAGE", 3)
    post_events(ndjson(*(record("step.tick", ts(i)) for i in range(8))), run_id="long")
    body = html(operator_client.get("/runs/long"))
    assert event_ids(body) == ["e6", "e7", "e8"]
    assert "Show from the start" in body and 'hx-get="?after=8"' in body
    assert event_ids(html(operator_client.get("/runs/long?after=0"))) == ["e1", "e2", "e3"]


def test_a_long_finished_run_pages_forward_with_show_more(
    operator_client, post_events, monkeypatch
):
    monkeypatch.setattr(views, "TIMELINE_PAGE", 3)
    post_events(
        ndjson(*(record("step.tick", ts(i)) for i in range(5)), record("run.exit_clean", ts(9))),
        run_id="long",
    )
    body = html(operator_client.get("/runs/long"))
    assert event_ids(body) == ["e1", "e2", "e3"]
    assert 'href="/runs/long?after=3">Show more events' in body
    more = operator_client.get(
        "/runs/long?after=3", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="timeline-next"
    )
    assert more.status_code == 200  # not 286: "show more" is not the poller
    assert event_ids(html(more)) == ["e4", "e5", "e6"]
    assert "Show more" not in html(more) and "Live follow ended" not in html(more)


def test_jump_to_first_error_points_at_the_first_error_row(operator_client, finished, monkeypatch):
    body = html(operator_client.get("/runs/done-1"))
    assert '<a class="jump" href="#e6">Jump to first error</a>' in body
    monkeypatch.setattr(views, "TIMELINE_PAGE", 2)
    paged = html(operator_client.get("/runs/done-1"))
    assert 'href="/runs/done-1?after=5#e6">Jump to first error' in paged
    assert "e6" in event_ids(html(operator_client.get("/runs/done-1?after=5")))


def test_the_jsonl_download_is_the_gitoma_record_shape(operator_client, finished):
    body = html(operator_client.get("/runs/done-1"))
    assert 'href="/runs/done-1/events.jsonl">Download JSONL' in body
    response = operator_client.get("/runs/done-1/events.jsonl?filter=phase.")
    assert response["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [line["data"]["phase"] for line in lines] == ["PLANNING", "WORKING"]
    assert set(lines[0]) == {"ts", "slug", "phase", "level", "event", "data"}
    # The API link of the issue works for a logged-in operator too.
    api = operator_client.get("/api/runs/done-1/events?format=jsonl")
    assert len(b"".join(api.streaming_content).splitlines()) == 7


def test_the_jsonl_file_name_is_safe_whatever_the_slug(operator_client, post_events):
    post_events(ndjson(record("run.begin", slug='evil"\r\nSet-Cookie: x=1')), run_id="r")
    response = operator_client.get("/runs/r/events.jsonl")
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="evil-set-cookie-x1-')


def test_lineage_links_the_parent_and_the_forks(operator_client, finished, post_events):
    post_events(ndjson(record("run.begin", ts(40), data={"parent_run_id": "done-1"})), run_id="f1")
    post_events(ndjson(record("run.begin", ts(50), data={"parent_run_id": "done-1"})), run_id="f2")
    parent = html(operator_client.get("/runs/done-1"))
    assert 'href="/runs/f1"' in parent and 'href="/runs/f2"' in parent
    child = html(operator_client.get("/runs/f1"))
    lineage = child[child.index('id="lineage-title"') :].split("</section>")[0]
    assert 'href="/runs/done-1"' in lineage
    assert f'<option value="{finished.pk}">parent · done-1</option>' in lineage


def test_ingest_refuses_run_ids_that_no_url_could_name(post_events):
    for run_id in ("owner/repo@2026-04-21", "=cmd|' /C calc'!A9", ".", ".."):
        answer = post_events(ndjson(record("run.begin", run_id=run_id)))
        assert answer.status_code == 400, run_id
        (error,) = answer.json()["errors"]
        assert error["line"] == 1 and error["error"].startswith("run_id: must not"), run_id
    answer = post_events(ndjson(record("run.begin")), run_id="a/b")
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith("run_id: must not contain '/'")
    assert not Run.objects.exists()


def test_run_ids_with_slashes_stored_before_the_rule_stay_addressable(operator_client, project):
    # Ingest refuses them now (docs/decisions.md); runs stored earlier keep their pages.
    Run.objects.create(project=project, run_id="octocat__hello-world/2026-04-21T05-12-34")
    body = html(operator_client.get("/"))
    assert 'href="/runs/octocat__hello-world/2026-04-21T05-12-34"' in body
    page = html(operator_client.get("/runs/octocat__hello-world/2026-04-21T05-12-34"))
    assert 'href="/runs/octocat__hello-world/2026-04-21T05-12-34/events.jsonl"' in page
    jsonl = operator_client.get("/runs/octocat__hello-world/2026-04-21T05-12-34/events.jsonl")
    assert jsonl.status_code == 200


def test_a_run_id_used_by_two_projects_links_the_other(
    operator_client, post_events, stranger, project
):
    post_events(ndjson(record("run.begin", slug="ours__x")), run_id="same")
    post_events(ndjson(record("run.begin", slug="theirs__y")), run_id="same", auth=stranger[1])
    newest = html(operator_client.get("/runs/same"))
    assert "theirs__y" in newest and 'href="/runs/same?project=acme">Acme agents' in newest
    ours = html(operator_client.get("/runs/same?project=acme"))
    assert '<h1 id="run-title">ours__x</h1>' in ours
    assert 'name="project" value="acme"' in ours  # the poller stays on this run


def test_a_run_without_events_shows_how_to_send_them(operator_client, token, client):
    client.post(
        "/api/runs/empty%3Cb%3E'run/heartbeat",
        {"pid": 7},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    body = html(operator_client.get("/runs/empty%3Cb%3E'run"))
    assert "No runs yet" in body  # the first-trace help, with this run's id, escaped
    assert "api/ingest/events?run_id=empty%3Cb%3E%27run'" in body
    assert "No artifacts." in body and "How an agent uploads one" in body
    assert "/api/runs/empty%3Cb%3E%27run/artifacts/diff.patch" in body
    assert "<b>" not in body


def test_only_http_urls_in_event_data_become_links(operator_client, post_events):
    post_events(
        ndjson(
            record(
                "pr.open",
                data={
                    "url": "javascript:alert(document.cookie)",
                    "html_url": "https://github.com/o/r/pull/7",
                    "ci_url": " JaVaScRiPt:alert(1)",
                    "data_url": "data:text/html,<script>alert(1)</script>",
                },
            ),
            record("run.exit_clean"),
        ),
        run_id="links",
    )
    body = html(operator_client.get("/runs/links"))
    parser = _Collect()
    parser.feed(body)
    hrefs = [attrs.get("href", "") for tag, attrs in parser.elements if tag == "a"]
    assert "https://github.com/o/r/pull/7" in hrefs
    assert not [h for h in hrefs if h.strip().lower().startswith(("javascript:", "data:"))]


def test_the_run_page_takes_a_bounded_number_of_queries(
    operator_client, post_events, django_assert_max_num_queries
):
    names = [f"ns{i}.step" for i in range(40)]
    post_events(
        ndjson(
            record("run.begin"),
            *(record(names[i % 40], level="error" if i == 7 else "info") for i in range(600)),
        ),
        run_id="big",
    )
    post_events(ndjson(record("run.begin", data={"parent_run_id": "big"})), run_id="fork")
    run = Run.objects.get(run_id="big")
    for i in range(5):
        Artifact.store(run, f"file{i}.txt", b"x" * 10, "text/plain")
    with django_assert_max_num_queries(12):
        body = html(operator_client.get("/runs/big?after=0"))
    assert len(event_ids(body)) == views.TIMELINE_PAGE
    with django_assert_max_num_queries(5):
        operator_client.get("/runs/big?after=590", **HX_POLL)
    with django_assert_max_num_queries(6):
        operator_client.get("/runs/big?filter=ns1.", **HX_TIMELINE)


# --- Compare ----------------------------------------------------------------------


def test_compare_shows_two_runs_side_by_side_with_phase_durations(
    operator_client, finished, post_events
):
    post_events(
        ndjson(
            record("run.begin", ts(100)),
            record("phase.start", ts(100), data={"phase": "PLANNING"}),
            record("phase.start", ts(105), data={"phase": "WORKING"}),
            record("phase.start", ts(107), data={"phase": "PLANNING"}),
            record("phase.start", ts(110), data={"phase": "FAILED"}),
        ),
        run_id="retry-1",
    )
    other = Run.objects.get(run_id="retry-1")
    body = html(operator_client.get(f"/compare/?run={finished.pk}&run={other.pk}"))
    assert "<title>Compare done-1 and retry-1 · Runlens</title>" in body
    assert '<span class="badge st-succeeded">' in body and '<span class="badge st-failed">' in body
    phases = body[body.index('id="phases-title"') :].split("</section>")[0]
    # done-1: PLANNING 1 s → 12 s, WORKING 12 s → the clean exit at 31 s.
    # retry-1: PLANNING 5 s + 3 s (twice), WORKING 2 s, FAILED 0 ms (finished at once).
    rows = [row.split("</tr>")[0] for row in phases.split('<th scope="row">')[1:]]
    assert rows[0].startswith("PLANNING") and "11.0 s" in rows[0] and "8.00 s (2×)" in rows[0]
    assert rows[1].startswith("WORKING") and "19.0 s" in rows[1] and "2.00 s" in rows[1]
    assert rows[2].startswith("FAILED") and "—" in rows[2] and "0 ms" in rows[2]


def test_compare_without_two_runs_explains_how_to_pick(operator_client, finished):
    body = html(operator_client.get(f"/compare/?run={finished.pk}"))
    assert "Pick exactly two runs" in body


# --- Untrusted data ----------------------------------------------------------------

PAYLOADS = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    "javascript:window.__pwned=1",
    '<a hx-get="/logout/" hx-trigger="load">x</a>',
    "{{ 1234|add:4321 }}",
]


def test_agent_data_is_escaped_and_never_reaches_htmx_attributes(operator_client, post_events):
    payload = " ".join(PAYLOADS)
    post_events(
        ndjson(
            record(
                "run.begin",
                slug=f"evil{PAYLOADS[0]}",
                phase=PAYLOADS[1][:60],
                message=payload,
                data={
                    "tags": PAYLOADS,
                    "attributes": {PAYLOADS[3]: PAYLOADS[1]},
                    "url": PAYLOADS[2],
                    PAYLOADS[0]: payload,
                },
            ),
            record(f'x.<img src=x onerror="1">.{PAYLOADS[0]}', message=PAYLOADS[3]),
            record("y", level="error", phase=PAYLOADS[0][:60]),
        ),
        run_id='evil"><img src=x onerror="alert(1)">',  # no `/`: ingest refuses those
    )
    run = Run.objects.get()
    Artifact.store(run, PAYLOADS[1], PAYLOADS[0].encode(), "text/plain")
    pages = [
        "/",
        f"/runs/{run.run_id}",
        f"/runs/{run.run_id}?filter={PAYLOADS[0]}",
        f"/artifacts/{run.artifacts.get().pk}/",
        f"/compare/?run={run.pk}&run={run.pk}",
    ]
    for url in pages:
        body = html(operator_client.get(url))
        for raw in ("<script>window", "<img src=x", '<a hx-get="/logout/"', "5555"):
            assert raw not in body, (url, raw)
        parser = _Collect()
        parser.feed(body)
        for tag, attrs in parser.elements:
            if tag == "script":
                assert attrs.get("src", "").startswith("/static/"), url  # no inline script
            assert "style" not in attrs, (url, tag)  # CSP: no inline style
            for name, value in attrs.items():
                assert not name.startswith("on"), (url, tag, name)
                if name.startswith("hx-"):
                    # Only our own constants and numbers: no agent text at all.
                    assert "evil" not in value and "pwned" not in value and "<" not in value
                if name == "href":
                    assert not value.lower().lstrip().startswith("javascript:"), url


def test_the_run_page_lists_the_error_groups_the_run_fed(operator_client, post_events):
    post_events(
        ndjson(
            record("run.begin"),
            record("tool.bash", level="error", message="<b>boom</b>", data={"error": "E: x"}),
            record("tool.bash", level="error", message="<b>boom</b>", data={"error": "E: x"}),
            record("run.crashed", level="error", data={"exit_code": 3}),
        ),
        run_id="bad",
    )
    post_events(ndjson(record("run.begin")), run_id="good")
    body = html(operator_client.get("/runs/bad"))
    section = body.split('id="errors-title"')[1].split("</section>")[0]
    assert section.count('href="/errors/') == 2  # the tool failure (twice) and the crash
    assert "<b>boom" not in section  # agent text, escaped
    assert '<td class="num">2</td>' in section
    assert "No errors reported by this run." in html(operator_client.get("/runs/good"))


def test_a_run_whose_reports_outlived_their_retention_says_why_none_is_listed(
    operator_client, finished
):
    """The counters say 1 error; the reports are gone: the section says why, not "no errors"."""
    old = timezone.now() - timedelta(days=40)
    ErrorReport.objects.filter(run=finished).update(received_at=old)
    Run.objects.filter(pk=finished.pk).update(created=old, last_event_at=old, last_heartbeat=None)
    assert prune_error_reports() == 1
    body = html(operator_client.get("/runs/done-1"))
    section = body[body.index('id="run-errors"') :].split("</section>")[0]
    assert "No errors reported" not in body
    assert "counted 1 error event, but its error report was removed by retention" in section
    assert "kept for 30 days (<code>ERROR_REPORT_MAX_AGE_DAYS</code>)" in section
    link = '<a href="/runs/done-1?project=acme&amp;level=error#timeline">'
    assert link in section
    # Where the link leads: the run's error events, still in its timeline.
    errors = html(operator_client.get("/runs/done-1?project=acme&level=error"))
    timeline = errors[errors.index('id="timeline"') :]
    assert "tool.failed" in timeline and "git.commit" not in timeline


def test_a_run_whose_reports_the_per_issue_cap_removed_says_so(
    operator_client, post_events, settings
):
    settings.ERROR_REPORTS_PER_GROUP = 1
    for run_id in ("first", "second"):
        post_events(
            ndjson(record("run.begin"), record("tool.bash", level="error", message="disk full")),
            run_id=run_id,
        )
    assert prune_error_reports() == 1  # the group keeps the second run's report only
    first = html(operator_client.get("/runs/first"))
    section = first[first.index('id="run-errors"') :].split("</section>")[0]
    assert "each issue keeps only its newest 1 report (<code>ERROR_REPORTS_PER_GROUP</code>)" in (
        section
    )
    assert "level=error#timeline" in section
    second = html(operator_client.get("/runs/second"))
    assert 'id="errors-title"' in second and 'href="/errors/' in second


# --- Layout: what the operator came for first -----------------------------------------

SECTIONS = [
    "run-summary",
    "timeline",
    "run-errors",
    "run-spans",
    "run-metrics",
    "run-artifacts",
    "run-lineage",
]


def sections(body: str) -> dict[str, tuple[str, dict]]:
    """The run page's sections by id, in page order: (tag, attributes)."""
    parser = _Collect()
    parser.feed(body)
    return {a["id"]: (tag, a) for tag, a in parser.elements if a.get("id") in SECTIONS}


def test_the_run_page_shows_the_summary_then_the_timeline_then_the_rest(operator_client, finished):
    body = html(operator_client.get("/runs/done-1"))
    assert list(sections(body)) == SECTIONS
    summary = body[body.index('id="run-summary"') :].split("</section>")[0]
    facts = [part.split("</dt>")[0] for part in summary.split("<dt>")[1:]]
    assert facts[:5] == ["Duration", "Exit code", "Tokens in / out", "Cost", "Errors / warnings"]


def test_an_empty_section_is_one_line_not_a_box_with_a_heading(operator_client, finished):
    """`finished` has an error, and no spans, metrics, artifacts or forks."""
    body = html(operator_client.get("/runs/done-1"))
    found = sections(body)
    for name in ("run-spans", "run-metrics", "run-artifacts", "run-lineage"):
        tag, attrs = found[name]
        assert attrs["class"] == "empty-line", name
    for heading in ("spans-title", "run-metrics-title", "artifacts-title", "lineage-title"):
        assert f'id="{heading}"' not in body
    for line in ("No spans.", "No metrics.", "No artifacts.", "Not a fork, and no forks."):
        assert line in body
    # A section with something to show is a card with its heading.
    assert "card" in found["run-errors"][1]["class"] and 'id="errors-title"' in body
    Artifact.store(finished, "notes.txt", b"hello", "text/plain")
    body = html(operator_client.get("/runs/done-1"))
    assert "card" in sections(body)["run-artifacts"][1]["class"] and "No artifacts." not in body


def test_a_live_run_without_metrics_still_polls_for_its_first_ones(operator_client, live):
    body = html(operator_client.get("/runs/live-1"))
    tag, attrs = sections(body)["run-metrics"]
    assert attrs["class"] == "empty-line"
    assert attrs["hx-get"] == f"/run-metrics/{live.pk}" and attrs["hx-swap"] == "outerHTML"
