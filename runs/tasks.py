from __future__ import annotations

import logging

from celery import shared_task

from portal.logging import housekeeping_level
from runs import partitions
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
def ensure_partitions() -> int:
    """Keep PARTITIONS_AHEAD days of event partitions ready (runs/partitions.py)."""
    made = partitions.ensure()
    logger.log(
        housekeeping_level(len(made)),
        "partitions: %s day(s) of events made ready",
        len(made),
        extra={"days": [day.isoformat() for day in made]},
    )
    return len(made)
