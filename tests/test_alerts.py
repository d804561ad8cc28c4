"""Alert conditions and the evaluation round, delivered to a real HTTP receiver.

Each condition is made true, evaluated, made false: it fires once, stays quiet while
true, respects its cooldown and (state-like ones) resolves. Time is passed to the
round explicitly; deliveries run eagerly through the Celery task, over real HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from runs.models import EventCount, Run
from telemetry import retention
from telemetry.alerts import conditions
from telemetry.alerts.evaluation import run_round
from telemetry.models import (
    AlertChannel,
    AlertRule,
    AlertState,
    ErrorGroup,
    IngestBatch,
    ProjectLimits,
    RefusalCount,
    SlugErrorCount,
)
from tests.alert_receiver import running_receiver
from tests.conftest import ndjson, record

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver():
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def hook(receiver) -> AlertChannel:
    return AlertChannel.objects.create(name="ops", kind="webhook", url=receiver.url)


@pytest.fixture
def evaluate(django_capture_on_commit_callbacks):
    """One round at `now`; its messages are delivered (eagerly) once it commits."""

    def evaluate(now: datetime):
        with django_capture_on_commit_callbacks(execute=True):
            return run_round(now)

    return evaluate


def make_rule(project, hook, condition: str, **fields) -> AlertRule:
    rule = AlertRule.objects.create(
        name=fields.pop("name", f"{condition} rule"),
        project=project,
        condition=condition,
        cooldown_minutes=fields.pop("cooldown_minutes", 30),
        **fields,
    )
    rule.channels.add(hook)
    return rule


def minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


# --- Each condition: how to make it true, and false again --------------------------


def errors_true(project, now):
    EventCount.objects.create(project=project, minute=minute(now), events=80, errors=60)


def errors_false(project, now):
    EventCount.objects.filter(project=project).delete()


def group(project, now, **fields) -> ErrorGroup:
    return ErrorGroup.objects.create(
        project=project,
        fingerprint=fields.pop("fingerprint", "f1"),
        title=fields.pop("title", "TypeError: x is undefined"),
        first_seen=now,
        last_seen=now,
        count=3,
        **fields,
    )


def new_group_true(project, now):
    group(project, now)


def regressed_true(project, now):
    group(project, now, regressed=True)


def regressed_false(project, now):
    ErrorGroup.objects.get().set_status(ErrorGroup.Status.RESOLVED)


def orphan_true(project, now):
    Run.objects.create(
        project=project, run_id="r-orphan", slug="octocat__hello", status="orphaned", watched=True
    )


def orphan_false(project, now):
    Run.objects.get(run_id="r-orphan").heartbeat()


def failed_true(project, now):
    Run.objects.create(
        project=project,
        run_id="r-failed",
        slug="octocat__hello",
        status="crashed",
        exit_code=137,
        finished_at=now,
    )


def refused_true(project, now):
    RefusalCount.objects.create(project=project, minute=minute(now), refused=12)


def refused_false(project, now):
    RefusalCount.objects.all().delete()


def cost_true(project, now):
    Run.objects.create(
        project=project,
        run_id="r-costly",
        slug="octocat__hello",
        status="succeeded",
        started_at=now,
        cost_usd=Decimal("12.50"),
    )


def silent_true(project, now):
    Run.objects.create(project=project, run_id="r-old", slug="octocat__hello", status="succeeded")
    Run.objects.update(created=now - timedelta(minutes=30))
    AlertRule.objects.update(created=now - timedelta(hours=1))


def silent_false(project, now):
    Run.objects.create(project=project, run_id="r-new", slug="octocat__hello", created=now)


def backlog_true(project, now):
    IngestBatch.objects.create(project=project, body=b"", received_at=now - timedelta(seconds=120))


def backlog_false(project, now):
    IngestBatch.objects.update(state=IngestBatch.State.DONE)


def baseline_true(project, now):
    """Two days of one error event per run an hour, then five in the last hour."""
    counts, runs = [], []
    for k in range(0, 49):
        at = now - timedelta(hours=k, minutes=30)
        counts.append(
            EventCount(project=project, minute=minute(at), events=10, errors=5 if k == 0 else 1)
        )
        runs.append(Run(project=project, run_id=f"r-{k}", slug="octocat__hello", started_at=at))
    EventCount.objects.bulk_create(counts)
    Run.objects.bulk_create(runs)


def baseline_false(project, now):
    EventCount.objects.filter(minute__gt=now - timedelta(hours=1)).update(errors=1)


CASES = {
    "error_events": (dict(threshold=50, window_minutes=5), errors_true, errors_false),
    "new_error_group": ({}, new_group_true, None),
    "error_group_regressed": ({}, regressed_true, regressed_false),
    "run_orphaned": ({}, orphan_true, orphan_false),
    "run_failed": ({}, failed_true, None),
    "rate_limited": (dict(threshold=10, window_minutes=5), refused_true, refused_false),
    "cost_over": (dict(threshold=10), cost_true, None),
    "no_runs": (dict(window_minutes=10, slug="octocat__hello"), silent_true, silent_false),
    "ingest_backlog": (dict(threshold=60), backlog_true, backlog_false),
    "error_rate_above_baseline": (dict(threshold=50), baseline_true, baseline_false),
}


def test_every_condition_has_a_case():
    assert set(CASES) == set(conditions.CONDITIONS)


@pytest.mark.parametrize("condition", sorted(CASES))
def test_it_fires_once_stays_quiet_while_true_and_resolves(
    condition, project, hook, receiver, evaluate
):
    fields, make_true, make_false = CASES[condition]
    rule = make_rule(project, hook, condition, **fields)
    now = timezone.now()
    make_true(project, now)

    evaluate(now)
    assert receiver.wait(1)
    (fired,) = receiver.messages()
    assert fired["state"] == "firing"
    assert (fired["rule"], fired["condition"], fired["project"]) == (rule.name, condition, "acme")
    assert fired["url"].startswith("http://")

    evaluate(now + timedelta(seconds=30))
    evaluate(now + timedelta(seconds=60))
    assert len(receiver.messages()) == 1, "a true condition fires once"
    rule.refresh_from_db()
    assert rule.last_fired_at == now
    assert rule.last_delivery_error == "" and rule.last_delivery_at is not None

    if make_false is None:
        # A one-off happening (a new group, a failed run, a day's spend) never un-happens.
        assert not conditions.CONDITIONS[condition].resolves
        return
    make_false(project, now + timedelta(seconds=61))
    evaluate(now + timedelta(seconds=90))
    assert receiver.wait(2)
    resolved = receiver.messages()[1]
    assert resolved["state"] == "resolved"
    assert resolved["subject"] == fired["subject"]
    assert resolved["text"].startswith(f"[Runlens] RESOLVED {rule.name}")


@pytest.mark.parametrize(
    "condition", sorted(c for c, (_, _, false) in CASES.items() if false is not None)
)
def test_a_condition_that_flaps_within_its_cooldown_is_sent_again_only_after_it(
    condition, project, hook, receiver, evaluate
):
    fields, make_true, make_false = CASES[condition]
    make_rule(project, hook, condition, cooldown_minutes=30, **fields)
    now = timezone.now()
    make_true(project, now)
    evaluate(now)
    make_false(project, now)
    evaluate(now + timedelta(minutes=1))
    assert receiver.wait(2)  # fired, resolved

    # True again five minutes later: within the cooldown, nothing is sent …
    state = AlertState.objects.get()
    again = now + timedelta(minutes=5)
    _make_true_again(condition, project, again)
    evaluate(again)
    state.refresh_from_db()
    assert state.state == "firing" and not state.notified
    assert len(receiver.messages()) == 2
    # … and once the cooldown is over, if still true, it is.
    later = now + timedelta(minutes=31)
    _keep_true(condition, project, later)
    evaluate(later)
    assert receiver.wait(3)
    assert [m["state"] for m in receiver.messages()] == ["firing", "resolved", "firing"]


def _make_true_again(condition, project, at):
    if condition == "error_group_regressed":
        ErrorGroup.objects.update(status="unresolved", regressed=True)
    elif condition == "run_orphaned":
        Run.objects.filter(run_id="r-orphan").update(status="orphaned")
    elif condition == "no_runs":
        Run.objects.update(created=at - timedelta(minutes=30))
    elif condition == "ingest_backlog":
        IngestBatch.objects.update(state=IngestBatch.State.PENDING)
    elif condition == "error_rate_above_baseline":
        EventCount.objects.filter(minute__gt=at - timedelta(hours=1)).update(errors=5)
    else:
        CASES[condition][1](project, at)


def _keep_true(condition, project, at):
    """The windowed counts move on with time: refill the window at `at`."""
    if condition in ("error_events", "rate_limited"):
        CASES[condition][1](project, at)
    elif condition == "no_runs":
        Run.objects.update(created=at - timedelta(minutes=30))
    elif condition == "error_rate_above_baseline":
        EventCount.objects.all().delete()
        Run.objects.all().delete()
        baseline_true(project, at)


# --- Semantics across conditions -----------------------------------------------------


def test_several_subjects_firing_in_one_round_go_out_as_one_message(
    project, hook, receiver, evaluate
):
    make_rule(project, hook, "run_failed")
    now = timezone.now()
    for i in range(3):
        Run.objects.create(
            project=project, run_id=f"r{i}", slug=f"s{i}", status="failed", finished_at=now
        )
    evaluate(now)
    assert receiver.wait(1)
    (message,) = receiver.messages()
    assert len(message["subjects"]) == 3
    assert message["text"].startswith("[Runlens] run_failed rule: 3 subjects")
    assert "s0: run r0 failed" in message["text"]

    Run.objects.create(project=project, run_id="r9", slug="s9", status="failed", finished_at=now)
    evaluate(now + timedelta(seconds=30))
    assert receiver.wait(2)
    assert [s["subject"] for s in receiver.messages()[1]["subjects"]] == [
        f"run:{Run.objects.get(run_id='r9').pk}"
    ]


def test_the_payload_has_text_first_then_the_fields_of_the_spec(project, hook, receiver, evaluate):
    now = timezone.now()
    make_rule(project, hook, "error_events", threshold=50, window_minutes=5, slug="")
    errors_true(project, now)
    evaluate(now)
    assert receiver.wait(1)
    raw = receiver.received[0]
    assert raw.headers["Content-Type"] == "application/json"
    assert list(raw.json)[:11] == [
        "text",
        "rule",
        "condition",
        "project",
        "slug",
        "subject",
        "value",
        "threshold",
        "url",
        "fired_at",
        "state",
    ]
    body = raw.json
    assert body["value"] == 60 and body["threshold"] == 50
    assert body["url"] == "http://127.0.0.1:8000/errors"
    assert body["text"] == (
        "[Runlens] error_events rule: acme: 60 error events in 5 min (threshold 50)\n"
        "http://127.0.0.1:8000/errors"
    )
    assert datetime.fromisoformat(body["fired_at"]) == now


def test_error_events_count_ingested_error_events_per_slug(
    project, hook, receiver, evaluate, post_events
):
    now = timezone.now()
    make_rule(
        project, hook, "error_events", threshold=3, window_minutes=5, slug="octocat__hello-world"
    )
    ts = now.isoformat()
    errors = [record("tool.error", ts=ts, level="error", data={"i": i}) for i in range(3)]
    other = [record("tool.error", ts=ts, level="error", slug="other__repo") for _ in range(5)]
    assert post_events(ndjson(*errors[:2]), run_id="a").status_code == 202
    assert post_events(ndjson(*other), run_id="b").status_code == 202
    evaluate(now)
    assert receiver.messages() == []  # two of this slug's, five of another's
    assert post_events(ndjson(errors[2]), run_id="a").status_code == 202
    evaluate(now + timedelta(seconds=30))
    assert receiver.wait(1)
    assert receiver.messages()[0]["slug"] == "octocat__hello-world"
    assert receiver.messages()[0]["value"] == 3


def test_answers_429_are_counted_for_the_rate_limited_alert(
    project, token, client, hook, receiver, evaluate
):
    ProjectLimits.objects.create(project=project, ingest_per_minute=1)
    make_rule(project, hook, "rate_limited", threshold=10, window_minutes=5)
    statuses = [
        client.post(
            "/api/ingest/events",
            ndjson(record("a.b")),
            content_type="application/x-ndjson",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        ).status_code
        for _ in range(12)
    ]
    assert statuses.count(429) == 11
    assert sum(RefusalCount.objects.values_list("refused", flat=True)) == 11
    evaluate(timezone.now())
    assert receiver.wait(1)
    assert receiver.messages()[0]["value"] == 11


def test_a_new_error_group_from_ingested_events_fires_and_an_ignored_one_does_not(
    project, hook, receiver, evaluate, post_events
):
    group(project, timezone.now(), fingerprint="old")  # there before the rule: not new
    make_rule(project, hook, "new_error_group")
    ts = timezone.now().isoformat()
    post_events(ndjson(record("deploy.failed", ts=ts, level="error", message="boom")), run_id="r")
    evaluate(timezone.now())
    assert receiver.wait(1)
    (message,) = receiver.messages()
    assert message["text"].startswith("[Runlens] new_error_group rule: new error group: ")
    assert "/errors/" in message["url"]
    ErrorGroup.objects.create(
        project=project,
        fingerprint="muted",
        title="muted",
        status="ignored",
        first_seen=timezone.now(),
        last_seen=timezone.now(),
    )
    evaluate(timezone.now())
    evaluate(timezone.now())
    assert len(receiver.messages()) == 1


def test_cost_over_fires_again_on_a_new_utc_day(project, hook, receiver, evaluate):
    day = datetime(2026, 4, 21, 23, 0, tzinfo=UTC)
    rule = make_rule(project, hook, "cost_over", threshold=10)
    AlertRule.objects.filter(pk=rule.pk).update(created=day - timedelta(days=1))
    cost_true(project, day)
    evaluate(day)
    tomorrow = day + timedelta(hours=2)
    Run.objects.create(
        project=project,
        run_id="r-next",
        slug="octocat__hello",
        started_at=tomorrow,
        cost_usd=Decimal("11"),
    )
    evaluate(tomorrow)
    assert receiver.wait(2)
    first, second = receiver.messages()
    assert "on 2026-04-21" in first["text"] and "on 2026-04-22" in second["text"]
    assert second["value"] == 11


def test_a_rule_without_history_has_no_baseline_verdict(project, hook, receiver, evaluate):
    now = timezone.now()
    make_rule(project, hook, "error_rate_above_baseline", threshold=10)
    EventCount.objects.create(project=project, minute=minute(now), events=100, errors=100)
    evaluate(now)
    assert receiver.messages() == []


def test_a_broken_rule_is_reported_and_does_not_stop_the_others(
    project, hook, receiver, evaluate, monkeypatch
):
    now = timezone.now()
    broken = make_rule(project, hook, "ingest_backlog", threshold=1, name="broken")
    make_rule(project, hook, "error_events", threshold=50, window_minutes=5, name="fine")
    errors_true(project, now)

    def explode(rule, now):
        raise RuntimeError("the condition failed")

    monkeypatch.setitem(
        conditions.CONDITIONS, "ingest_backlog", conditions.ConditionCheck(explode, True)
    )
    result = evaluate(now)
    assert result.failed_rules == ["broken"]
    assert receiver.wait(1)
    assert receiver.messages()[0]["rule"] == "fine"
    broken.refresh_from_db()
    assert broken.last_eval_error == "RuntimeError: the condition failed"


def test_a_rule_whose_condition_changes_starts_over(project, hook, receiver, evaluate):
    now = timezone.now()
    rule = make_rule(project, hook, "error_events", threshold=50, window_minutes=5)
    errors_true(project, now)
    evaluate(now)
    assert AlertState.objects.count() == 1
    rule.condition = "rate_limited"
    rule.restart()
    rule.save()
    assert AlertState.objects.count() == 0


def test_disabled_rules_and_channels_send_nothing(project, hook, receiver, evaluate):
    now = timezone.now()
    rule = make_rule(project, hook, "error_events", threshold=50, window_minutes=5)
    errors_true(project, now)
    AlertChannel.objects.update(enabled=False)
    evaluate(now)
    AlertRule.objects.filter(pk=rule.pk).update(enabled=False)
    evaluate(now + timedelta(hours=1))
    assert receiver.messages() == []


def test_retention_drops_the_alert_counts_after_eight_days(project):
    now = timezone.now()
    for days in (1, 9):
        at = minute(now - timedelta(days=days))
        RefusalCount.objects.create(project=project, minute=at, refused=1)
        SlugErrorCount.objects.create(project=project, slug="s", minute=at, errors=1)
    assert retention.prune_alert_counts(now) == 2
    assert RefusalCount.objects.count() == SlugErrorCount.objects.count() == 1


def test_rules_on_different_slugs_of_a_project_each_see_their_own_runs(
    project, hook, receiver, evaluate
):
    make_rule(project, hook, "run_failed", name="a fails", slug="o__a")
    make_rule(project, hook, "run_failed", name="b fails", slug="o__b")
    make_rule(project, hook, "cost_over", name="b spends", slug="o__b", threshold=1)
    now = timezone.now()
    for slug in ("o__a", "o__b", "o__c"):
        Run.objects.create(
            project=project,
            run_id=f"r-{slug}",
            slug=slug,
            status="failed",
            finished_at=now,
            started_at=now,
            cost_usd=Decimal(5),
        )
    evaluate(now)
    assert receiver.wait(3)
    got = {m["rule"]: [s["slug"] for s in m["subjects"]] for m in receiver.messages()}
    assert got == {"a fails": ["o__a"], "b fails": ["o__b"], "b spends": ["o__b"]}
