"""Run retention: keep the newest N runs per slug and nothing older than the max age.

(The retention job, error reports included, is telemetry/retention.py.)

Days of events older than every project keeps are dropped whole (their partitions);
the events of runs pruned otherwise (the per-slug limit, a shorter age) have no
database-level foreign key, so they are deleted explicitly, in chunks, before their
runs: a prune never holds long locks on the hot table.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from django.db import connection, transaction
from django.utils import timezone

from runs import partitions
from runs.models import EventCount, Project, Run, RunMetric

CHUNK = 200


def expired_run_ids(project: Project) -> list[int]:
    """Runs past the project's policy: beyond the newest N of their slug, or too old."""
    cutoff = timezone.now() - timedelta(days=project.retention_max_age_days)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT id FROM (
                SELECT id, created,
                       row_number() OVER (PARTITION BY slug ORDER BY id DESC) AS rank
                FROM runs_run WHERE project_id = %s AND status <> 'running'
            ) ranked
            WHERE rank > %s OR created < %s
            """,
            [project.id, project.retention_runs_per_slug, cutoff],
        )
        return [row[0] for row in cursor.fetchall()]


# What another app keeps per run and deletes with it (telemetry: spans), called with
# each chunk of run ids inside its transaction: runs never imports telemetry.
RunsDeleted = Callable[[list[int]], None]


def delete_runs(run_ids: list[int], also: RunsDeleted | None = None) -> int:
    deleted = 0
    for start in range(0, len(run_ids), CHUNK):
        chunk = run_ids[start : start + CHUNK]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DELETE FROM runs_event WHERE run_id = ANY(%s)", [chunk])
            cursor.execute("DELETE FROM runs_runmetric WHERE run_id = ANY(%s)", [chunk])
            if also is not None:
                also(chunk)
            Run.objects.filter(parent_id__in=chunk).update(parent=None)
            deleted += Run.objects.filter(id__in=chunk).delete()[1].get("runs.Run", 0)
    return deleted


def drop_expired_partitions() -> list:
    """Drop the days of events older than every project keeps (runs/partitions.py):
    a catalogue change, however many events the day held. A project that keeps less
    than the longest-keeping one loses its older events with their runs, below."""
    keep = max(Project.objects.values_list("retention_max_age_days", flat=True), default=None)
    if keep is None:
        return []
    return partitions.drop_before(timezone.now() - timedelta(days=keep))


def prune_runs(also: RunsDeleted | None = None) -> dict[str, int]:
    """Apply every project's run retention now. Returns runs deleted per project slug.

    A run's events and metric points go with it (`also`: what other apps keep per
    run). Metric points of no run (about the fleet) go by the project's maximum age.
    """
    drop_expired_partitions()
    result = {}
    for project in Project.objects.all():
        result[project.slug] = delete_runs(expired_run_ids(project), also)
        cutoff = timezone.now() - timedelta(days=project.retention_max_age_days)
        EventCount.objects.filter(project=project, minute__lt=cutoff).delete()
        RunMetric.objects.filter(project=project, run__isnull=True, recorded_at__lt=cutoff).delete()
    return result
