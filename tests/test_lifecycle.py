"""How lifecycle events move a run through its statuses (SPEC §3)."""

from __future__ import annotations

from runs.models import Run
from tests.conftest import ndjson, record


def run_after(post_events, *records) -> Run:
    post_events(ndjson(*records), run_id="r")
    return Run.objects.get(run_id="r")


def test_run_begin_opens_a_running_run_with_its_context(post_events):
    run = run_after(
        post_events,
        record(
            "run.begin",
            pid=4242,
            host="rig-1",
            data={
                "command": "review",
                "work_rig": "gastown",
                "work_bead": "b-7",
                "tags": ["nightly"],
            },
        ),
    )
    assert run.status == "running"
    assert run.kind == "review"
    assert (run.pid, run.host) == (4242, "rig-1")
    assert run.attributes == {"work_rig": "gastown", "work_bead": "b-7"}
    assert run.tags == ["nightly"]
    assert run.started_at.isoformat().startswith("2026-04-21T05:12:34.123")


def test_phase_start_sets_the_phase(post_events):
    run = run_after(
        post_events, record("run.begin"), record("phase.start", data={"phase": "PLANNING"})
    )
    assert run.phase == "PLANNING"


def test_a_clean_exit_succeeds_and_records_the_duration(post_events):
    run = run_after(
        post_events,
        record("run.begin", ts="2026-04-21T05:00:00Z"),
        record("run.exit_clean", ts="2026-04-21T05:00:42.5Z", phase="PR_OPEN"),
    )
    assert (run.status, run.exit_clean, run.phase) == ("succeeded", True, "PR_OPEN")
    assert run.duration_ms == 42_500
    assert run.finished_at is not None


def test_a_clean_exit_with_nonzero_code_fails(post_events):
    run = run_after(
        post_events, record("run.begin"), record("run.exit_clean", data={"exit_code": 2})
    )
    assert (run.status, run.exit_code) == ("failed", 2)


def test_a_crash_marks_the_run_crashed(post_events):
    run = run_after(
        post_events,
        record("run.begin"),
        record("run.crashed", level="error", data={"exit_code": 137}),
    )
    assert (run.status, run.exit_clean, run.exit_code) == ("crashed", False, 137)
    assert run.errors_count == 1


def test_terminal_phases_finish_the_run(post_events):
    post_events(
        ndjson(record("run.begin"), record("phase.start", data={"phase": "DONE"})), run_id="ok"
    )
    post_events(ndjson(record("run.begin"), record("phase.start", phase="FAILED")), run_id="ko")
    assert Run.objects.get(run_id="ok").status == "succeeded"
    assert Run.objects.get(run_id="ko").status == "failed"


def test_an_orphaned_run_that_speaks_again_is_running(post_events, project):
    Run.objects.create(project=project, run_id="r", status=Run.Status.ORPHANED)
    assert run_after(post_events, record("llm.call")).status == "running"


def test_llm_calls_add_up_tokens_and_cost_per_run(post_events):
    run = run_after(
        post_events,
        record("llm.call", data={"model": "a", "tokens_in": 100, "tokens_out": 10}),
        record(
            "llm.call", data={"model": "b", "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
        ),
        record("llm.call", data={"model": "c", "tokens_in": "many", "cost_usd": "0.5"}),
    )
    assert (run.tokens_in, run.tokens_out) == (105, 11)
    assert float(run.cost_usd) == 0.5


def test_new_runs_of_a_batch_are_created_in_run_id_order(post_events):
    # Two batches creating the same runs must take their locks in the same order, or
    # PostgreSQL aborts one of them as a deadlock: the order is the run ids', not the
    # order the records happen to arrive in.
    post_events(ndjson(record("a.b", run_id="zulu"), record("a.b", run_id="alpha")))
    created = list(Run.objects.order_by("id").values_list("run_id", flat=True))
    assert created == ["alpha", "zulu"]
