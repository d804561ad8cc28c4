from __future__ import annotations

from celery import shared_task

from runs import retention
from runs.models import Run


@shared_task(ignore_result=True)
def detect_orphans() -> int:
    return Run.objects.mark_orphans()


@shared_task(ignore_result=True)
def prune() -> dict[str, int]:
    return retention.prune()
