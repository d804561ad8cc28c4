"""`manage.py logs SLUG`: the latest run's events, for people or for jq (SPEC §6)."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from runs.management.commands import logs
from runs.models import Run
from tests.conftest import ndjson, record

SLUG = "octocat__hello-world"


def run_logs(*args, **options) -> list[str]:
    out = io.StringIO()
    call_command("logs", *args, stdout=out, **options)
    return out.getvalue().splitlines()


@pytest.fixture
def shipped(post_events):
    """An older finished run and the latest one of the same slug."""
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="old")
    post_events(
        ndjson(
            record("run.begin", ts="2026-04-21T05:12:34.123Z", data={"command": "run"}),
            record("phase.start", phase="WORKING", data={"phase": "WORKING"}),
            record(
                "llm.call",
                ts="2026-04-21T05:12:35.5Z",
                phase="WORKING",
                data={"model": "m-1", "tokens_in": 12, "prompt": "fix the README"},
            ),
            record("git.commit", phase="WORKING", level="warn", data={"files": ["README.md"]}),
        ),
        run_id="new",
    )


def test_it_prints_the_latest_run_in_human_format(shipped):
    lines = run_logs(SLUG)
    assert len(lines) == 4
    assert lines[0] == "05:12:34.123 INFO   -  run.begin  command=run"
    # JSONB keeps keys shortest first, so that is the order they come back in.
    assert lines[2] == (
        '05:12:35.500 INFO   WORKING  llm.call  model=m-1 prompt="fix the README" tokens_in=12'
    )
    assert lines[3].split()[1:4] == ["WARN", "WORKING", "git.commit"]
    assert lines[3].endswith('files=["README.md"]')


def test_it_prints_exactly_the_gitoma_record_with_raw(shipped):
    records = [json.loads(line) for line in run_logs(SLUG, raw=True)]
    assert [r["event"] for r in records] == ["run.begin", "phase.start", "llm.call", "git.commit"]
    for rec in records:
        assert set(rec) == {"ts", "slug", "phase", "level", "event", "data"}
        assert rec["slug"] == SLUG
    assert records[2] == {
        "ts": "2026-04-21T05:12:35.500+00:00",
        "slug": SLUG,
        "phase": "WORKING",
        "level": "info",
        "event": "llm.call",
        "data": {"model": "m-1", "tokens_in": 12, "prompt": "fix the README"},
    }


def test_it_keeps_only_events_under_the_filter_prefix(shipped):
    lines = run_logs(SLUG, filter="llm.")
    assert len(lines) == 1 and "llm.call" in lines[0]
    assert run_logs(SLUG, filter="nothing.") == []


def test_it_accepts_owner_slash_repo_and_a_repository_url(shipped):
    assert len(run_logs("octocat/hello-world")) == 4
    assert len(run_logs("https://github.com/octocat/hello-world")) == 4


def test_it_names_an_unknown_slug_clearly(shipped):
    with pytest.raises(CommandError, match="no runs for slug 'nobody__nothing'"):
        run_logs("nobody__nothing")


def test_it_can_be_limited_to_one_project(shipped, stranger, post_events):
    _, their_token = stranger
    post_events(ndjson(record("their.event")), run_id="theirs", auth=their_token)
    assert "their.event" in run_logs(SLUG)[0]
    assert len(run_logs(SLUG, project="acme")) == 4
    with pytest.raises(CommandError, match="in project 'nope'"):
        run_logs(SLUG, project="nope")


def test_it_reads_in_keyset_pages_without_a_query_per_event(
    post_events, monkeypatch, django_assert_max_num_queries
):
    monkeypatch.setattr(logs, "PAGE", 10)
    post_events(ndjson(*[record("a.b", data={"i": i}) for i in range(35)]), run_id="big")
    # run lookup + status + 4 pages, whatever the number of events
    with django_assert_max_num_queries(6):
        lines = run_logs(SLUG, raw=True)
    assert [json.loads(line)["data"]["i"] for line in lines] == list(range(35))


def test_it_stops_following_a_run_that_has_finished(shipped):
    assert Run.objects.get(run_id="new").status == "running"
    Run.objects.filter(run_id="new").update(status="succeeded")
    assert len(run_logs(SLUG, follow=True)) == 4


def test_it_follows_a_running_run_until_it_ends(shipped, post_events, monkeypatch):
    polls = []

    def meanwhile(seconds):
        # What the agent does while `logs --follow` waits: one more event, then a clean exit.
        polls.append(seconds)
        if len(polls) == 1:
            post_events(ndjson(record("pr.open", phase="PR_OPEN")), run_id="new")
        else:
            post_events(ndjson(record("run.exit_clean", phase="PR_OPEN")), run_id="new")

    monkeypatch.setattr(logs, "sleep", meanwhile)
    lines = run_logs(SLUG, follow=True)
    assert [line.split()[3] for line in lines[4:]] == ["pr.open", "run.exit_clean"]
    assert polls == [1.0, 1.0]


def test_it_exits_quietly_on_ctrl_c(shipped, monkeypatch):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(logs, "sleep", interrupt)
    assert len(run_logs(SLUG, follow=True)) == 4
