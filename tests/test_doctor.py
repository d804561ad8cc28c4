"""`manage.py doctor --runs`: Gitoma's tracked-runs table (SPEC §6)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs.management.commands import doctor
from runs.models import Run
from tests.conftest import ndjson, record

LONG_AGO = timezone.now() - timedelta(hours=1)


def make_run(project, slug: str, run_id: str = "", **fields) -> Run:
    fields.setdefault("created", LONG_AGO)
    return Run.objects.create(project=project, slug=slug, run_id=run_id or slug, **fields)


def table(*args) -> tuple[list[list[str]], str]:
    """The rows of the table split into cells, and the whole output."""
    out = io.StringIO()
    call_command("doctor", "--runs", *args, stdout=out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "Tracked runs"
    assert lines[2].split() == ["Repo", "Phase", "PID", "Heartbeat", "Verdict"]
    rows = []
    for line in lines[3:]:
        if not line:
            break
        cells = line.split()
        rows.append([cells[0], cells[1], cells[2], " ".join(cells[3:-1]), cells[-1]])
    return rows, text


@pytest.fixture
def gitoma_world(project, post_events):
    """The three runs of Gitoma's documentation, oldest first."""
    now = timezone.now()
    make_run(project, "octocat__a", phase="DONE", status="succeeded", finished_at=now)
    # A clean exit at PR_OPEN, through the real ingest path: waiting for a review.
    ts = (now - timedelta(minutes=20)).isoformat()
    post_events(
        ndjson(
            record("run.begin", ts=ts, slug="octocat__b"),
            record("phase.start", ts=ts, slug="octocat__b", data={"phase": "PR_OPEN"}),
            record("run.exit_clean", ts=ts, slug="octocat__b", phase="PR_OPEN"),
        ),
        run_id="b",
    )
    Run.objects.filter(run_id="b").update(last_heartbeat=now - timedelta(minutes=12))
    make_run(
        project,
        "acme__c",
        phase="WORKING",
        pid=1234,
        last_heartbeat=now - timedelta(minutes=15),
    )


def test_it_shows_gitomas_example_table(gitoma_world):
    rows, text = table()
    assert rows == [
        ["acme/c", "WORKING", "1234", "15m ago", "ORPHANED"],
        ["octocat/b", "PR_OPEN", "—", "12m ago", "idle"],
        ["octocat/a", "DONE", "—", "never", "done"],
    ]
    assert "[!]  1 orphaned run(s) detected." in text
    assert "/admin/runs/run/?status__exact=orphaned" in text
    assert "python manage.py detect_orphans" in text


def test_it_prints_no_orphan_line_when_all_is_well(project):
    make_run(project, "octocat__a", phase="DONE", status="succeeded")
    make_run(project, "octocat__live", phase="WORKING", last_heartbeat=timezone.now())
    rows, text = table()
    assert [row[-1] for row in rows] == ["running", "done"]
    assert "orphaned" not in text


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"status": "failed", "phase": "WORKING"}, "done"),
        ({"status": "crashed", "phase": "WORKING"}, "done"),
        ({"status": "cancelled"}, "done"),
        ({"status": "running", "phase": "FAILED"}, "done"),
        ({"status": "running", "phase": "PR_OPEN", "exit_clean": True}, "idle"),
        ({"status": "orphaned", "phase": "WORKING"}, "ORPHANED"),
        # Silent since LONG_AGO, after promising signs of life (run.begin).
        ({"status": "running", "phase": "WORKING", "watched": True}, "ORPHANED"),
    ],
)
def test_it_gives_each_state_its_verdict(project, fields, expected):
    make_run(project, "octocat__x", **fields)
    rows, _ = table()
    assert rows[0][-1] == expected


def test_it_shows_one_row_per_slug_from_its_latest_run(project):
    make_run(project, "octocat__a", "a-1", status="orphaned", phase="WORKING")
    make_run(project, "octocat__b", "b-1", phase="DONE", status="succeeded")
    make_run(project, "octocat__a", "a-2", phase="DONE", status="succeeded")
    rows, text = table()
    assert [(row[0], row[-1]) for row in rows] == [("octocat/a", "done"), ("octocat/b", "done")]
    assert "orphaned run(s)" not in text


def test_it_measures_heartbeat_age_from_the_newest_sign_of_life():
    now = timezone.now()
    run = Run(last_heartbeat=now - timedelta(hours=5), last_event_at=now - timedelta(seconds=20))
    assert doctor.age(run, now) == "20s ago"
    run.last_event_at = None
    assert doctor.age(run, now) == "5h ago"
    assert doctor.age(Run(last_event_at=now - timedelta(minutes=90)), now) == "90m ago"
    assert doctor.age(Run(last_heartbeat=now - timedelta(days=3)), now) == "3d ago"
    assert doctor.age(Run(), now) == "never"


def test_it_lists_at_most_fifty_slugs_newest_first(project, django_assert_num_queries):
    Run.objects.bulk_create(
        [
            Run(project=project, slug=f"octocat__r{i}", run_id=f"r{i}", phase="DONE")
            for i in range(55)
        ]
    )
    with django_assert_num_queries(2):  # the latest runs, then which of them are silent
        rows, _ = table()
    assert len(rows) == 50
    assert (rows[0][0], rows[-1][0]) == ("octocat/r54", "octocat/r5")


def test_it_says_so_when_nothing_is_tracked(db):
    out = io.StringIO()
    call_command("doctor", "--runs", stdout=out)
    assert "(no runs yet)" in out.getvalue()
