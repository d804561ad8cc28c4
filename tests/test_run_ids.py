"""Run ids with odd characters are readable everywhere a run is read.

Ingest refuses only what a URL path cannot carry as one segment (`/`, `.`, `..`);
every other id must reach the read API, the run page and the page's htmx fragments.
A client percent-encodes the id; the pages build their links with `{% url %}`,
which must quote it the same way. Runs are made with the ORM: what is tested is
reading, whatever ingest lets in.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import unescape
from html.parser import HTMLParser
from urllib.parse import quote

import pytest
from django.urls import reverse

from runs.models import Event, Run
from telemetry.models import ErrorGroup, ErrorReport

ODD_IDS = [
    "=cmd|' calc'!A9",  # a spreadsheet formula
    "a b",
    "50%",
    "50%25",  # already looks percent-encoded: must not be decoded twice
    "x?y#z",
    "naïve-run",
    "<b>&amp;\"'",
    "a+b;c=d,e@f:g",
    "~tilde",
    "...",  # not `.` or `..`: an ordinary segment
    " padded ",
    "?q",
    "#h",
]
HX_TIMELINE = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "timeline"}
HX_POLL = {
    "HTTP_HX_REQUEST": "true",
    "HTTP_HX_TARGET": "timeline-next",
    "HTTP_HX_TRIGGER": "timeline-next",
}


@pytest.fixture(params=ODD_IDS, ids=range(len(ODD_IDS)))
def odd_run(request, project) -> Run:
    run = Run.objects.create(project=project, run_id=request.param, slug="octocat__odd")
    at = datetime(2026, 4, 21, 5, 12, 34, tzinfo=UTC)
    Event.objects.bulk_create(
        [
            Event(run=run, seq=1, ts=at, event="run.begin"),
            Event(run=run, seq=2, ts=at, event="tool.bash", level="error", message="boom"),
        ]
    )
    Run.objects.filter(pk=run.pk).update(events_count=2, errors_count=1, last_seq=2)
    run.refresh_from_db()
    return run


class _Links(HTMLParser):
    """The href of every element, as the browser reads it (entities decoded)."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.hrefs += [value for name, value in attrs if name == "href" and value]


def hrefs(body: str) -> list[str]:
    parser = _Links()
    parser.feed(body)
    return parser.hrefs


def test_the_read_api_reaches_a_run_by_its_percent_encoded_id(client, token, odd_run):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    path = "/api/runs/" + quote(odd_run.run_id, safe="")
    detail = client.get(path, **auth)
    assert detail.status_code == 200, detail.content
    assert detail.json()["run_id"] == odd_run.run_id
    events = client.get(path + "/events", **auth)
    assert events.status_code == 200, events.content
    assert [e["event"] for e in events.json()["items"]] == ["run.begin", "tool.bash"]
    jsonl = client.get(path + "/events?format=jsonl&level=error", **auth)
    assert len(b"".join(jsonl.streaming_content).splitlines()) == 1


def test_the_run_page_and_its_fragments_reach_a_run_with_an_odd_id(operator_client, odd_run):
    url = odd_run.get_absolute_url()
    assert url == "/runs/" + quote(odd_run.run_id, safe="!$&'()*+,;=~:@/")
    page = operator_client.get(url)
    assert page.status_code == 200
    body = page.content.decode()
    assert f"<code>{odd_run.run_id}</code>" in unescape(body)
    for fragment, headers in (("?filter=tool.", HX_TIMELINE), ("?after=1", HX_POLL)):
        response = operator_client.get(url + fragment, **headers)
        assert response.status_code in (200, 286)
        assert "tool.bash" in response.content.decode()
    # Every link the page gives to this run (chips, JSONL, jump to first error) leads to it.
    own = [h for h in hrefs(body) if h.startswith(url)]
    assert own and any("events.jsonl" in h for h in own)
    for href in own:
        response = operator_client.get(href.split("#")[0])
        assert response.status_code == 200, href


def test_the_runs_list_links_a_run_with_an_odd_id_to_its_page(operator_client, odd_run):
    body = operator_client.get("/").content.decode()
    assert reverse("runs:detail", args=[odd_run.run_id]) in hrefs(body)


def test_an_error_report_links_its_run_in_its_own_project(operator_client, odd_run, stranger):
    """The run's page URL, quoted by reverse(), and the report's project: run ids are
    unique per project only, and the newest namesake may be another project's."""
    Run.objects.create(project=stranger[0], run_id=odd_run.run_id)  # a newer namesake
    now = odd_run.created
    group = ErrorGroup.objects.create(
        project=odd_run.project, fingerprint="f", title="boom", first_seen=now, last_seen=now
    )
    ErrorReport.objects.create(
        group=group, project=odd_run.project, source="event", run=odd_run, event_seq=2
    )
    body = operator_client.get(f"/errors/{group.pk}").content.decode()
    links = [h for h in hrefs(body) if h.startswith("/runs/")]
    assert links and set(links) == {f"{odd_run.get_absolute_url()}?project=acme"}
    page = operator_client.get(links[0]).content.decode()
    assert "<dd>Acme agents</dd>" in page
