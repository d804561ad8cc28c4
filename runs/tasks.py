from __future__ import annotations

from celery import shared_task

from runs.models import Run


@shared_task(ignore_result=True)
def detect_orphans() -> int:
    return Run.objects.mark_orphans()
