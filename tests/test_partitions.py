"""Events by day: runs_event is partitioned on ts, made ahead by beat, dropped by age."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from django.db import connection

from portal.celery import app as celery_app
from runs import partitions, retention
from runs.models import Event, Run
from runs.tasks import ensure_partitions
from tests.conftest import ndjson, record

TODAY = datetime.now(UTC).date()


def partition_of(event: Event) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tableoid::regclass::text FROM runs_event WHERE id = %s", [event.id])
        return cursor.fetchone()[0]


def iso(day: date, hour: int = 12) -> str:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC).isoformat()


def test_a_new_installation_has_today_and_a_week_ahead(db, settings):
    assert partitions.days() == [TODAY + timedelta(days=n) for n in range(8)]
    assert settings.PARTITIONS_AHEAD == 7


def test_events_land_in_their_days_partition_and_odd_dates_in_the_default(post_events):
    post_events(
        ndjson(record("a.now", ts=iso(TODAY)), record("a.replayed", ts="2019-05-01T10:00:00Z")),
        run_id="r",
    )
    now, replayed = Event.objects.order_by("seq")
    assert partition_of(now) == partitions.name_of(TODAY)
    assert partition_of(replayed) == partitions.DEFAULT
    # Read like any other event, wherever it is kept.
    run = Run.objects.get(run_id="r")
    assert [e.event for e in Event.objects.timeline(run)] == ["a.now", "a.replayed"]


def test_making_a_day_moves_its_events_out_of_the_default(post_events):
    past = TODAY - timedelta(days=3)
    post_events(ndjson(record("a.early", ts=iso(past)), record("a.late", ts=iso(past, 23))))
    assert {partition_of(e) for e in Event.objects.all()} == {partitions.DEFAULT}

    assert partitions.ensure(today=past, ahead=0) == [past]

    assert {partition_of(e) for e in Event.objects.all()} == {partitions.name_of(past)}
    assert Event.objects.count() == 2


def test_beat_keeps_partitions_ahead(db):
    assert "runs.tasks.ensure_partitions" in {
        entry["task"] for entry in celery_app.conf.beat_schedule.values()
    }
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {partitions.name_of(TODAY + timedelta(days=7))}")
    assert ensure_partitions() == 1
    assert partitions.days()[-1] == TODAY + timedelta(days=7)
    assert ensure_partitions() == 0


def test_retention_drops_whole_days_older_than_every_project_keeps(post_events, project):
    project.retention_max_age_days = 5
    project.save()
    old, young = TODAY - timedelta(days=9), TODAY - timedelta(days=2)
    partitions.ensure(today=old, ahead=0)
    partitions.ensure(today=young, ahead=0)
    post_events(ndjson(record("a.old", ts=iso(old)), record("a.young", ts=iso(young))), run_id="r")

    dropped = retention.drop_expired_partitions()

    assert dropped == [old]
    assert old not in partitions.days() and young in partitions.days()
    assert list(Event.objects.values_list("event", flat=True)) == ["a.young"]


def test_the_longest_keeping_project_decides_which_days_are_dropped(post_events, project, stranger):
    other, _ = stranger
    project.retention_max_age_days = 5
    project.save()
    other.retention_max_age_days = 30
    other.save()
    old = TODAY - timedelta(days=9)
    partitions.ensure(today=old, ahead=0)

    assert retention.drop_expired_partitions() == []
    assert old in partitions.days()
