from __future__ import annotations

import logging

from celery import shared_task

from portal.logging import housekeeping_level
from runs import retention
from runs.models import Run

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def detect_orphans() -> int:
    marked = Run.objects.mark_orphans()
    logger.log(
        housekeeping_level(marked),
        "orphans: %s run(s) marked orphaned",
        marked,
        extra={"orphaned": marked},
    )
    return marked


@shared_task(ignore_result=True)
def prune() -> dict[str, int]:
    deleted = retention.prune()
    total = sum(deleted.values())
    logger.log(
        housekeeping_level(total),
        "retention: %s run(s) deleted",
        total,
        extra={"runs_deleted": {slug: n for slug, n in deleted.items() if n}},
    )
    return deleted
