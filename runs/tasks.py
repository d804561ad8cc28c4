from __future__ import annotations

import logging

from celery import shared_task

from portal.logging import housekeeping_level
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
