"""Thin Celery tasks for the ingest spool: ids in, the work lives in runs.ingest."""

from __future__ import annotations

from celery import shared_task

from runs import ingest


@shared_task(ignore_result=True)
def process_batch(batch_id: int) -> None:
    ingest.process_batch(batch_id)


@shared_task(ignore_result=True)
def sweep_pending() -> int:
    """Re-enqueue batches left pending (a worker died, the broker was down)."""
    from telemetry.models import IngestBatch

    ids = IngestBatch.objects.stale_pending()
    for batch_id in ids:
        process_batch.delay(batch_id)
    return len(ids)
