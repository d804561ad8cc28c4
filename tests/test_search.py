"""Finding events across runs: GET /api/events/search and the /search page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runs.models import Event
from tests.conftest import ndjson, record

NOW = datetime.now(UTC)


def at(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).isoformat(timespec="milliseconds")


@pytest.fixture
def events(post_events):
    """Three runs of events in the last day, and one old event."""
    post_events(
        ndjson(
            record("run.begin", ts=at(3), slug="fixer"),
            record("tool.call", ts=at(2.5), slug="fixer", message="pytest -q tests/"),
            record(
                "llm.call", ts=at(2), slug="fixer", data={"model": "gpt-4o", "note": "TimeOut x"}
            ),
            record(
                "tool.error", ts=at(1), slug="fixer", level="error", message="Timeout after 30s"
            ),
        ),
        run_id="run-a",
    )
    post_events(
        ndjson(
            record("run.begin", ts=at(5), slug="reviewer"),
            record(
                "review.note", ts=at(4), slug="reviewer", level="warn", message="100% of <b>x</b>"
            ),
        ),
        run_id="run-b",
    )
    post_events(ndjson(record("tool.error", ts=at(24 * 9), message="timeout, old")), run_id="old")
    assert Event.objects.count() == 7


def find(client, token, **params):
    response = client.get("/api/events/search", params, HTTP_AUTHORIZATION=f"Bearer {token}")
    return response


def names(response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.content
    return [(hit["run_id"], hit["event"]) for hit in response.json()["items"]]


def test_it_finds_text_in_names_messages_and_data_newest_first(client, token, events):
    assert names(find(client, token, q="timeout")) == [
        ("run-a", "tool.error"),  # the message
        ("run-a", "llm.call"),  # inside data, another case
    ]
    assert names(find(client, token, q="REVIEW.")) == [("run-b", "review.note")]


def test_the_default_window_is_the_last_24_hours_and_bounds_can_widen_it(client, token, events):
    since = (NOW - timedelta(days=30)).isoformat()
    found = names(find(client, token, q="timeout", since=since))
    assert found[-1] == ("old", "tool.error")
    until = (NOW - timedelta(hours=1, minutes=30)).isoformat()
    assert names(find(client, token, q="timeout", until=until, since=since)) == [
        ("run-a", "llm.call"),
        ("old", "tool.error"),
    ]


def test_it_narrows_by_slug_minimum_level_and_event_prefix(client, token, events):
    assert names(find(client, token, q="e", slug="reviewer")) == [
        ("run-b", "review.note"),
        ("run-b", "run.begin"),
    ]
    assert names(find(client, token, q="e", level="warn")) == [
        ("run-a", "tool.error"),
        ("run-b", "review.note"),
    ]
    assert names(find(client, token, q="e", event="tool.")) == [
        ("run-a", "tool.error"),
        ("run-a", "tool.call"),
    ]


def test_like_wildcards_in_the_query_match_themselves(client, token, events):
    assert names(find(client, token, q="100%")) == [("run-b", "review.note")]
    assert names(find(client, token, q="%")) == [("run-b", "review.note")]
    assert names(find(client, token, q="_")) == []  # no event holds an underscore


def test_pages_follow_one_another_without_overlap(client, token, events):
    seen, cursor = [], ""
    for _ in range(10):
        response = find(client, token, q="e", limit=2, cursor=cursor)
        seen += names(response)
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6
    assert seen == names(find(client, token, q="e", limit=50))


def test_a_token_finds_only_its_own_projects_events(client, stranger, events):
    _, other_token = stranger
    assert names(find(client, other_token, q="timeout")) == []


def test_each_hit_links_to_the_run_timeline_at_the_event(client, token, operator_client, events):
    hit = find(client, token, q="Timeout after").json()["items"][0]
    assert hit["url"].startswith("/runs/run-a?")
    page = operator_client.get(hit["url"])
    assert page.status_code == 200
    assert f'id="e{hit["seq"]}"' in page.content.decode()


@pytest.mark.parametrize(
    "params, problem",
    [
        ({"q": "x", "cursor": "nonsense"}, "cursor"),
        ({"q": "x", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"q": "x" * 201}, "q"),
        ({}, "q"),
        ({"q": "x", "level": "loud"}, "level"),
        ({"q": "x", "since": "yesterday"}, "since"),
    ],
)
def test_a_search_it_cannot_run_is_a_400_naming_the_problem(client, token, params, problem):
    response = find(client, token, **params)
    assert response.status_code == 400
    assert problem in response.content.decode()


def test_an_operator_searches_every_project_or_one(operator_client, events, stranger):
    found = operator_client.get("/api/events/search", {"q": "timeout"})
    assert names(found) == [("run-a", "tool.error"), ("run-a", "llm.call")]
    none = operator_client.get("/api/events/search", {"q": "timeout", "project": "nope"})
    assert names(none) == []


def test_the_search_page_shows_hits_as_text_with_links(operator_client, events):
    response = operator_client.get("/search", {"q": "100%"})
    body = response.content.decode()
    assert response.status_code == 200
    assert "&lt;b&gt;x&lt;/b&gt;" in body and "<b>x</b>" not in body
    assert "/runs/run-b?" in body


def test_the_search_page_says_when_nothing_matches_and_what_is_wrong(operator_client, events):
    assert "No event matches" in operator_client.get("/search", {"q": "zzz"}).content.decode()
    wrong = operator_client.get("/search", {"q": "x", "cursor": "bad"}).content.decode()
    assert "cursor" in wrong and 'role="alert"' in wrong
    assert operator_client.get("/search").status_code == 200  # the empty form


def test_the_search_results_are_an_htmx_fragment(operator_client, events):
    response = operator_client.get(
        "/search", {"q": "timeout"}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="results"
    )
    body = response.content.decode()
    assert body.lstrip().startswith('<section id="results"')
    assert "tool.error" in body
