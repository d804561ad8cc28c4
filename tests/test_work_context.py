"""Work context (rig, bead, molecule, role, agent): filters on the runs list, the read API
and a run's timeline; chips on run rows and the run header; synthetic OTLP runs are
never orphaned.

Runs come through the real ingest paths: Gitoma events (`post_events`) and the OTLP
receiver (`post_otlp`, protobuf bodies from tests/fixtures/otlp/payloads.py).
"""

from __future__ import annotations

import gzip
import re
import socket
from datetime import timedelta
from html import unescape

import orjson
import pytest
from django.db import connection
from django.utils import timezone

from runs import views, work_context
from runs.models import Event, Project, Run
from tests.conftest import ndjson, record
from tests.fixtures.otlp.payloads import (
    CHILD,
    GASTOWN,
    ROOT,
    TRACE,
    log,
    logs_request,
    span,
    traces_request,
)

HX_TIMELINE = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "timeline"}
HX_POLL = {
    "HTTP_HX_REQUEST": "true",
    "HTTP_HX_TARGET": "timeline-next",
    "HTTP_HX_TRIGGER": "timeline-next",
}
HOSTILE = "<script>alert(\"x\")</script> & 'q'"


def auth(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def post_otlp(client, token, django_capture_on_commit_callbacks):
    """POST an OTLP protobuf request to the real receiver and let the worker store it."""

    def post(signal: str, message, *, auth_token: str | None = None):
        extra = {
            "HTTP_AUTHORIZATION": f"Bearer {auth_token or token}",
            "HTTP_CONTENT_ENCODING": "gzip",
        }
        body = gzip.compress(message.SerializeToString())
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                f"/v1/{signal}", body, content_type="application/x-protobuf", **extra
            )
        assert response.status_code == 200, response.content
        return response

    return post


def begin(run_id: str, post_events, **data) -> None:
    post_events(ndjson(record("run.begin", data=data)), run_id=run_id)


@pytest.fixture
def fleet(post_events) -> None:
    """Three Gitoma runs: two rigs, two roles (the role through `data.attributes`)."""
    begin(
        "polecat-1",
        post_events,
        work_rig="gastown",
        work_bead="sg-05iq",
        work_mol="mol-1",
        attributes={"gt.role": "polecat", "gt.agent": "Toast"},
    )
    begin(
        "polecat-2",
        post_events,
        work_rig="sfgastown",
        work_bead="sg-g8vs",
        attributes={"gt.role": "polecat", "gt.agent": "Nux"},
    )
    begin("witness-1", post_events, work_rig="gastown", attributes={"gt.role": "witness"})
    begin("plain", post_events)


def listed(body: str) -> list[str]:
    """Run ids of the rows of the runs table, in order."""
    return re.findall(r'<a id="run-\d+" href="/runs/([^"]+)"', body)


# --- The runs list and GET /api/runs ---------------------------------------------------


def test_it_filters_the_runs_list_by_each_work_context_key_and_by_several(operator_client, fleet):
    def shown(query: str) -> set[str]:
        return set(listed(operator_client.get(f"/?{query}").content.decode()))

    assert shown("rig=gastown") == {"polecat-1", "witness-1"}
    assert shown("bead=sg-g8vs") == {"polecat-2"}
    assert shown("mol=mol-1") == {"polecat-1"}
    assert shown("role=polecat") == {"polecat-1", "polecat-2"}
    assert shown("agent=Nux") == {"polecat-2"}
    assert shown("rig=gastown&role=polecat") == {"polecat-1"}
    assert shown("rig=gastown&role=witness&status=running") == {"witness-1"}
    assert shown("rig=nowhere") == set()
    assert shown("") == {"polecat-1", "polecat-2", "witness-1", "plain"}


def test_the_list_keeps_the_work_context_filter_in_its_form_and_its_refresh(operator_client, fleet):
    body = operator_client.get("/?role=polecat").content.decode()
    assert 'name="role" value="polecat"' in body  # the poller includes #run-filters
    assert "Clear filters" in body
    refresh = operator_client.get(
        "/?project=&slug=&role=polecat&rig=",
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="runs",
    )
    assert set(listed(refresh.content.decode())) == {"polecat-1", "polecat-2"}


def test_it_filters_get_api_runs_by_work_context_within_the_token_project(
    client, token, stranger, fleet, post_events
):
    def ids(query: str, tok: str = token) -> list[str]:
        response = client.get(f"/api/runs?{query}", **auth(tok))
        assert response.status_code == 200, response.content
        return [r["run_id"] for r in response.json()["items"]]

    assert ids("rig=gastown") == ["witness-1", "polecat-1"]
    assert ids("role=polecat&agent=Toast") == ["polecat-1"]
    assert ids("bead=sg-g8vs&mol=none") == []
    # A stranger's token sees nothing of ours, whatever it filters by.
    other_project, other_token = stranger
    assert ids("rig=gastown", other_token) == []
    assert ids("role=polecat", other_token) == []
    # Its own runs of the same rig are its own.
    post_events(
        ndjson(record("run.begin", data={"work_rig": "gastown"})),
        run_id="theirs",
        auth=other_token,
    )
    assert ids("rig=gastown", other_token) == ["theirs"]
    assert ids("rig=gastown") == ["witness-1", "polecat-1"]


def test_the_api_pages_a_filtered_list_by_keyset(client, token, fleet):
    first = client.get("/api/runs?rig=gastown&limit=1", **auth(token)).json()
    assert [r["run_id"] for r in first["items"]] == ["witness-1"]
    second = client.get(
        f"/api/runs?rig=gastown&limit=1&cursor={first['next_cursor']}", **auth(token)
    ).json()
    assert [r["run_id"] for r in second["items"]] == ["polecat-1"]
    assert second["next_cursor"] is None


def test_a_too_long_work_context_value_is_a_400_naming_it(client, token):
    response = client.get("/api/runs?rig=" + "x" * 201, **auth(token))
    assert response.status_code == 400
    assert "rig" in response.content.decode()


def test_an_integer_work_context_value_matches_as_it_is_shown(client, token, post_events):
    begin("numbered", post_events, work_bead=42)
    assert Run.objects.get(run_id="numbered").attributes["work_bead"] == 42
    items = client.get("/api/runs?bead=42", **auth(token)).json()["items"]
    assert [r["run_id"] for r in items] == ["numbered"]


def test_the_filter_is_a_containment_answered_by_the_gin_index(db, project):
    """On a table big enough for the planner to care, `@>` goes through run_attributes_gin."""
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO runs_run (project_id, run_id, slug, kind, status, phase, host,
                   exit_clean, tags, attributes, events_count, errors_count, warnings_count,
                   tokens_in, tokens_out, cost_usd, last_seq, created)
               SELECT %s, 'r' || i, 's', '', 'succeeded', '', '', true, '[]',
                   jsonb_build_object('work_rig', 'rig-' || (i %% 500),
                                      'work_bead', 'b-' || i, 'gt.role', 'polecat'),
                   0, 0, 0, 0, 0, 0, 0, now()
               FROM generate_series(1, 30000) AS i""",
            [project.pk],
        )
        cursor.execute("ANALYZE runs_run")
    runs = work_context.filter_by(Run.objects.all(), "attributes", {"work_bead": "b-777"})
    sql = str(runs.query)
    assert "@>" in sql
    plan = runs.order_by("-id")[:51].explain()
    assert "run_attributes_gin" in plan, plan
    assert [r.run_id for r in runs] == ["r777"]


# --- Chips ------------------------------------------------------------------------------


def chip_links(body: str) -> list[str]:
    block = re.findall(r'<ul class="work-chips"[^>]*>(.*?)</ul>', body, re.S)
    return [unescape(href) for b in block for href in re.findall(r'href="([^"]+)"', b)]


def test_runs_show_their_work_context_as_chips_linking_to_the_filtered_list(operator_client, fleet):
    body = operator_client.get("/").content.decode()
    links = chip_links(body)
    for link in ("/?rig=gastown", "/?bead=sg-05iq", "/?mol=mol-1", "/?role=polecat"):
        assert link in links
    assert "/?agent=Toast" in links
    page = operator_client.get("/runs/polecat-1").content.decode()
    header = page.split('id="run-summary"', 1)[1].split("</section>", 1)[0]
    assert chip_links(header) == [
        "/?rig=gastown",
        "/?bead=sg-05iq",
        "/?mol=mol-1",
        "/?role=polecat",
        "/?agent=Toast",
    ]
    # Following a chip lists the runs it names.
    assert set(listed(operator_client.get("/?role=polecat").content.decode())) == {
        "polecat-1",
        "polecat-2",
    }


def test_hostile_work_context_values_are_escaped_in_chips_and_links(operator_client, post_events):
    begin("hostile", post_events, work_rig=HOSTILE, attributes={"gt.agent": '"><img src=x>'})
    for url in ("/", "/runs/hostile"):
        body = operator_client.get(url).content.decode()
        assert "<script>alert" not in body
        assert "<img src=x>" not in body
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;" in body
        # The link's value is percent-encoded: it cannot end the attribute or the query.
        assert 'href="/?rig=%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E+%26+%27q%27"' in body
        assert 'href="/?agent=%22%3E%3Cimg+src%3Dx%3E"' in body
    # The link finds the run again, `&` and all.
    found = operator_client.get("/", {"rig": HOSTILE}).content.decode()
    assert listed(found) == ["hostile"]


# --- The timeline ---------------------------------------------------------------------------


@pytest.fixture
def day_run(post_otlp) -> Run:
    """One service's day run: two polecats' records, each with its own role and bead."""
    toast = {**GASTOWN, "gt.work_bead": "sg-05iq"}
    nux = {**GASTOWN, "gt.role": "gastown/polecats/Nux", "gt.agent": "Nux"}
    nux["gt.work_bead"] = "sg-g8vs"
    post_otlp(
        "logs",
        logs_request(
            log("bd.call", attributes={"n": 1}),
            log("session.start"),
            log("bd.call", attributes={"n": 2}),
            resource=toast,
        ),
    )
    post_otlp(
        "logs",
        logs_request(log("bd.call", attributes={"n": 3}), log("bd.done"), resource=nux),
    )
    return Run.objects.get(run_id="gastown@2026-04-21")


def timeline_names(body: str) -> list[str]:
    return re.findall(r'<span class="name">([^<]*)</span>', body)


def test_otlp_records_keep_the_work_context_in_their_data(day_run):
    data = Event.objects.filter(run=day_run).order_by("seq").first().data
    assert (data["gt.role"], data["gt.agent"], data["work_bead"]) == (
        "gastown/polecats/Toast",
        "Toast",
        "sg-05iq",
    )


def test_the_timeline_filters_by_work_context_combined_with_the_namespace(operator_client, day_run):
    url = f"/runs/{day_run.run_id}"
    everything = operator_client.get(url + "?after=0", **HX_TIMELINE).content.decode()
    assert len(timeline_names(everything)) == 5
    toast = operator_client.get(url + "?agent=Toast&after=0").content.decode()
    assert timeline_names(toast) == ["bd.call", "session.start", "bd.call"]
    both = operator_client.get(
        url + "?filter=bd.&role=gastown/polecats/Nux", **HX_TIMELINE
    ).content.decode()
    assert timeline_names(both) == ["bd.call", "bd.done"]
    narrow = operator_client.get(
        url + "?filter=bd.call&bead=sg-05iq&level=info", **HX_TIMELINE
    ).content.decode()
    assert timeline_names(narrow) == ["bd.call", "bd.call"]
    none = operator_client.get(url + "?bead=sg-nothing", **HX_TIMELINE).content.decode()
    assert "No events match this filter" in none


def test_the_timeline_offers_the_context_values_of_the_run_as_chips(operator_client, day_run):
    body = operator_client.get(f"/runs/{day_run.run_id}?filter=bd.").content.decode()
    nav = body.split('aria-label="Filter by work context"', 1)[1].split("</nav>", 1)[0]
    links = [unescape(h) for h in re.findall(r'href="([^"]+)"', nav)]
    base = f"/runs/{day_run.run_id}"
    # Other filters are kept; each value is one click away.
    assert f"{base}?filter=bd.&agent=Nux" in links
    assert f"{base}?filter=bd.&bead=sg-05iq" in links
    assert f"{base}?filter=bd.&role=gastown%2Fpolecats%2FToast" in links
    assert f"{base}?filter=bd." in links  # "any context"
    active = operator_client.get(f"{base}?agent=Nux").content.decode()
    nav = active.split('aria-label="Filter by work context"', 1)[1].split("</nav>", 1)[0]
    assert re.search(r'aria-current="true"><span class="k">agent</span> Nux', nav)


def test_show_more_keeps_the_work_context_filter(operator_client, day_run, monkeypatch):
    monkeypatch.setattr(views, "TIMELINE_PAGE", 1)
    url = f"/runs/{day_run.run_id}"
    first = operator_client.get(url + "?agent=Toast&after=0").content.decode()
    more = unescape(re.search(r'<a href="([^"]+)">Show more events</a>', first)[1])
    assert "agent=Toast" in more
    rest = operator_client.get(more, **{**HX_TIMELINE, "HTTP_HX_TARGET": "timeline-next"})
    assert timeline_names(rest.content.decode()) == ["session.start"]


def test_live_follow_keeps_the_work_context_filter(operator_client, day_run, post_otlp):
    Run.objects.filter(pk=day_run.pk).update(status=Run.Status.RUNNING)
    url = f"/runs/{day_run.run_id}"
    page = operator_client.get(url + "?agent=Nux&filter=bd.").content.decode()
    form = page.split('id="timeline-filters"', 1)[1].split("</form>", 1)[0]
    assert '<input type="hidden" name="agent" value="Nux">' in form
    assert "Following live" in page
    cursor = Event.objects.filter(run=day_run).order_by("-seq").values_list("seq", flat=True)[0]
    nux = {**GASTOWN, "gt.role": "gastown/polecats/Nux", "gt.agent": "Nux"}
    post_otlp(
        "logs",
        logs_request(log("bd.call", attributes={"n": 4}), resource=nux),
    )
    post_otlp("logs", logs_request(log("bd.call", attributes={"n": 5})))  # Toast
    polled = operator_client.get(
        f"{url}?after={cursor}&filter=bd.&level=&agent=Nux&project=acme", **HX_POLL
    ).content.decode()
    assert timeline_names(polled) == ["bd.call"]
    assert "&quot;n&quot;: 4" in polled


def test_the_jsonl_download_and_the_events_api_apply_the_work_context(
    operator_client, client, token, day_run
):
    url = f"/runs/{day_run.run_id}/events.jsonl?agent=Nux"
    lines = b"".join(operator_client.get(url).streaming_content).splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["bd.call", "bd.done"]
    api = client.get(
        f"/api/runs/{day_run.run_id}/events?bead=sg-05iq&filter=bd.", **auth(token)
    ).json()
    assert [e["data"]["n"] for e in api["items"]] == [1, 2]


# --- OTLP runs carry the context on the run -------------------------------------------------


def test_runs_opened_by_otlp_logs_and_spans_are_filterable_by_work_context(
    operator_client, client, token, post_otlp
):
    prime = {"run.id": "run-1", "work_rig": "gastown", "work_bead": "sg-05iq", "work_mol": "m1"}
    post_otlp("logs", logs_request(log("prime", attributes=prime)))
    post_otlp(
        "traces",
        traces_request(span("session", ROOT), span("tool", CHILD, ROOT), resource=GASTOWN),
    )
    run = Run.objects.get(run_id="run-1")
    assert {k: run.attributes[k] for k in work_context.PARAMS.values()} == {
        "work_rig": "gastown",
        "work_bead": "sg-05iq",
        "work_mol": "m1",
        "gt.role": "gastown/polecats/Toast",
        "gt.agent": "Toast",
    }
    trace_run = Run.objects.get(run_id=f"trace-{TRACE}")
    assert trace_run.attributes["gt.agent"] == "Toast"

    def ids(query: str) -> set[str]:
        return {
            r["run_id"] for r in client.get(f"/api/runs?{query}", **auth(token)).json()["items"]
        }

    assert ids("bead=sg-05iq") == {"run-1"}
    assert ids("agent=Toast") == {"run-1", f"trace-{TRACE}"}
    assert set(listed(operator_client.get("/?mol=m1").content.decode())) == {"run-1"}


# --- Synthetic runs and orphans -------------------------------------------------------------


def test_synthetic_otlp_runs_are_not_orphaned_while_a_silent_real_run_is(
    post_otlp, post_events, settings
):
    # Records of 2026-04-21, long silent: a day run and a trace run (logs, no root span).
    post_otlp(
        "logs",
        logs_request(
            log("no.trace"),
            log("with.trace", trace_id=TRACE, span_id=CHILD),
            resource={"service.name": "codebuddy"},
        ),
    )
    begin("real", post_events)  # a Gitoma run that never exits: silent since April
    synthetic = {"codebuddy@2026-04-21", f"trace-{TRACE}"}
    assert set(Run.objects.filter(status="running").values_list("run_id", flat=True)) == {
        *synthetic,
        "real",
    }
    assert set(Run.objects.orphans().values_list("run_id", flat=True)) == {"real"}
    assert Run.objects.mark_orphans() == 1
    statuses = dict(Run.objects.values_list("run_id", "status"))
    assert statuses == {"real": "orphaned", **{run_id: "running" for run_id in synthetic}}


def test_a_day_runs_last_pid_on_this_host_does_not_orphan_it(db, project):
    silent = timezone.now() - timedelta(seconds=5)  # not silent long enough
    dead_pid = 2**31 - 2
    host = socket.gethostname()
    for run_id in ("svc@2026-12-01", "agent-run"):
        Run.objects.create(
            project=project, run_id=run_id, host=host, pid=dead_pid, last_event_at=silent
        )
    assert Run.objects.mark_orphans() == 1
    assert Run.objects.get(run_id="agent-run").status == "orphaned"
    assert Run.objects.get(run_id="svc@2026-12-01").status == "running"


@pytest.mark.parametrize(
    "run_id",
    ["trace-5B8EFFF798038103D269B633813FC60C", "trace-123", "me@2026-4-1", "a/b@2026-04-21"],
)
def test_run_ids_that_only_look_synthetic_are_still_watched(db, project, run_id):
    old = timezone.now() - timedelta(hours=1)
    Run.objects.create(project=project, run_id=run_id, last_event_at=old, watched=True)
    assert Run.objects.mark_orphans() == 1


def test_the_stranger_project_is_untouched_by_our_filters(operator_client, fleet, stranger):
    # Operators see every project; a project filter still narrows.
    other, _ = stranger
    Run.objects.create(project=other, run_id="theirs", attributes={"work_rig": "gastown"})
    assert set(listed(operator_client.get("/?rig=gastown&project=acme").content.decode())) == {
        "polecat-1",
        "witness-1",
    }
    assert "theirs" in listed(operator_client.get("/?rig=gastown").content.decode())
    assert Project.objects.count() == 2
