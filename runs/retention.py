"""Retention: keep the newest N runs per slug and nothing older than the max age;
error reports by their own age and per-group cap.

Events have no database-level foreign key, so they are deleted explicitly, in
chunks, before their runs: a prune never holds long locks on the hot table.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from runs.models import EventCount, Project, Run

CHUNK = 200
REPORT_CHUNK = 5000

logger = logging.getLogger(__name__)


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


def delete_runs(run_ids: list[int]) -> int:
    deleted = 0
    for start in range(0, len(run_ids), CHUNK):
        chunk = run_ids[start : start + CHUNK]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DELETE FROM runs_event WHERE run_id = ANY(%s)", [chunk])
            Run.objects.filter(parent_id__in=chunk).update(parent=None)
            deleted += Run.objects.filter(id__in=chunk).delete()[1].get("runs.Run", 0)
    return deleted


def prune() -> dict[str, int]:
    """Apply every project's retention policy now. Returns runs deleted per project slug."""
    result = {}
    for project in Project.objects.all():
        result[project.slug] = delete_runs(expired_run_ids(project))
        cutoff = timezone.now() - timedelta(days=project.retention_max_age_days)
        EventCount.objects.filter(project=project, minute__lt=cutoff).delete()
    reports = prune_error_reports()
    logger.info("retention: %s error report(s) deleted", reports, extra={"reports": reports})
    from telemetry.health import record_retention  # the status page shows the last run

    record_retention(result, reports)
    return result


def prune_error_reports(now: datetime | None = None) -> int:
    """Error reports follow their own policy: ERROR_REPORT_MAX_AGE_DAYS, and the newest
    ERROR_REPORTS_PER_GROUP of each group. Groups stay (their count and triage state
    are the record); see docs/errors.md."""
    from telemetry.models import ErrorGroup, ErrorReport

    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.ERROR_REPORT_MAX_AGE_DAYS)
    deleted = 0
    while True:  # in chunks: a prune never holds long locks on the reports table
        ids = list(
            ErrorReport.objects.filter(received_at__lt=cutoff).values_list("id", flat=True)[
                :REPORT_CHUNK
            ]
        )
        if not ids:
            break
        deleted += ErrorReport.objects.filter(id__in=ids).delete()[0]
    cap = settings.ERROR_REPORTS_PER_GROUP
    # Only groups that ever had more reports than the cap can be over it.
    crowded = list(ErrorGroup.objects.filter(count__gt=cap).values_list("id", flat=True))
    for start in range(0, len(crowded), CHUNK):
        with connection.cursor() as cursor:
            cursor.execute(
                """
                DELETE FROM telemetry_errorreport WHERE id IN (
                    SELECT id FROM (
                        SELECT id, row_number() OVER (
                            PARTITION BY group_id ORDER BY received_at DESC, id DESC
                        ) AS rank
                        FROM telemetry_errorreport WHERE group_id = ANY(%s)
                    ) ranked WHERE rank > %s
                )
                """,
                [crowded[start : start + CHUNK], cap],
            )
            deleted += cursor.rowcount
    return deleted
