"""Thin Celery tasks: ids in, the work lives in the pipeline and the models."""

from __future__ import annotations

import logging

from celery import shared_task

from portal.logging import housekeeping_level, request_id_var
from telemetry import ratelimit, retention
from telemetry.alerts import delivery, evaluation
from telemetry.ingest import pipeline
from telemetry.models import IngestBatch

logger = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def process_batch(batch_id: int) -> None:
    token = None
    if not request_id_var.get():
        # Sent by the sweeper, not by the request: name the request that spooled it.
        found = IngestBatch.objects.filter(pk=batch_id).values_list("request_id", flat=True)
        if found and found[0]:
            token = request_id_var.set(found[0])
    try:
        stored = pipeline.process(batch_id)
        # One line a batch is noise at any real rate: DEBUG (failures raise and log).
        logger.debug(
            "batch %s %s",
            batch_id,
            "stored" if stored else "already done",
            extra={"batch": batch_id},
        )
    finally:
        if token is not None:
            request_id_var.reset(token)


@shared_task(ignore_result=True)
def drain_spool(kind: str) -> None:
    stored = pipeline.drain(kind, more=lambda: drain_spool.delay(kind))
    logger.debug("%s: %s batch(es) stored", kind, stored, extra={"batches": stored})


@shared_task(ignore_result=True)
def sweep_pending() -> int:
    """Re-enqueue batches left pending (a worker died, the broker was down)."""
    ids = IngestBatch.objects.stale_pending()
    for batch_id in ids:
        process_batch.delay(batch_id)
    logger.log(
        housekeeping_level(len(ids)),
        "sweep: %s pending batch(es) re-enqueued",
        len(ids),
        extra={"batches": len(ids)},
    )
    return len(ids)


@shared_task(ignore_result=True)
def purge_rate_counters() -> int:
    """Drop rate-limit slots that left the sliding window."""
    return ratelimit.purge()


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


@shared_task(ignore_result=True)
def evaluate_alerts() -> int:
    """One evaluation round of every alert rule (beat, every 30 s)."""
    result = evaluation.run_round()
    return len(result.messages) if result is not None else 0


@shared_task(bind=True, ignore_result=True, max_retries=delivery.RETRIES)
def deliver_alert(self, channel_id: int, rule_id: int | None, body: dict) -> None:
    """One message to one channel; timeouts, 5xx and 429 are retried with backoff."""
    attempt = self.request.retries
    if delivery.deliver(channel_id, rule_id, body, attempt, last=attempt >= delivery.RETRIES):
        raise self.retry(countdown=delivery.backoff(attempt))
