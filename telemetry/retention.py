"""The retention job: runs by each project's policy (runs/retention.py), error reports
by their own age and per-group cap, then the status page's record of the run."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from portal.logging import housekeeping_level
from runs.models import Project
from runs.retention import CHUNK, prune_runs
from telemetry.health import record_retention
from telemetry.models import ErrorGroup, ErrorReport, RefusalCount, SlugErrorCount, Span

REPORT_CHUNK = 5000

logger = logging.getLogger(__name__)


def prune() -> dict[str, int]:
    """Apply every retention policy now. Returns runs deleted per project slug."""
    result = prune_runs(also=delete_spans_of_runs)
    prune_spans_without_runs()
    reports = prune_error_reports()
    prune_alert_counts()
    logger.log(
        housekeeping_level(reports),
        "retention: %s error report(s) deleted",
        reports,
        extra={"reports": reports},
    )
    record_retention(result, reports)
    return result


def delete_spans_of_runs(run_ids: list[int]) -> None:
    """A pruned run's spans go with it (runs/retention.py calls this per chunk)."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM telemetry_span WHERE run_id = ANY(%s)", [run_ids])


def prune_spans_without_runs() -> int:
    """Spans that belong to no run (an exporter's spans before any run was named) go by
    their project's maximum age."""
    deleted = 0
    for project in Project.objects.all():
        cutoff = timezone.now() - timedelta(days=project.retention_max_age_days)
        stale = Span.objects.filter(project=project, run__isnull=True, start_time__lt=cutoff)
        deleted += stale.delete()[0]
    return deleted


def prune_alert_counts(now: datetime | None = None) -> int:
    """The per-minute counts alerts read (refusals, errors per slug) are needed for the
    longest look back of any condition, the 7-day baseline: 8 days are kept."""
    cutoff = (now or timezone.now()) - timedelta(days=8)
    refusals = RefusalCount.objects.filter(minute__lt=cutoff).delete()[0]
    return refusals + SlugErrorCount.objects.filter(minute__lt=cutoff).delete()[0]


def prune_error_reports(now: datetime | None = None) -> int:
    """Error reports follow their own policy: ERROR_REPORT_MAX_AGE_DAYS, and the newest
    ERROR_REPORTS_PER_GROUP of each group. Groups stay (their count and triage state
    are the record); see docs/errors.md."""
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
