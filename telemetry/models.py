from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from runs.models import Project

logger = logging.getLogger(__name__)


class IngestBatchQuerySet(models.QuerySet):
    def stale_pending(self, older_than: int | None = None, limit: int = 1000) -> list[int]:
        """Ids of batches pending for longer than a worker should need."""
        seconds = older_than if older_than is not None else settings.SWEEP_PENDING_AFTER_SECONDS
        cutoff = timezone.now() - timedelta(seconds=seconds)
        return list(
            self.filter(state=IngestBatch.State.PENDING, received_at__lt=cutoff)
            .order_by("received_at")
            .values_list("id", flat=True)[:limit]
        )


class IngestBatch(models.Model):
    """The durable spool: one accepted request body, kept until a worker has processed it.

    A request is answered only after its row is committed, so a 202 never claims
    data that was not stored. Workers claim rows by state; the partial index keeps
    the pending ones cheap to find however large the table grows.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    class Kind(models.TextChoices):
        EVENTS = "events"

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, models.CASCADE, related_name="batches")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.EVENTS)
    received_at = models.DateTimeField(default=timezone.now)
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    # zlib-compressed, already size-checked body; `params` holds query parameters
    # that change its meaning (the default run_id).
    body = models.BinaryField()
    params = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    # What the request answered: accepted/rejected/errors, replayed on a retry.
    summary = models.JSONField(default=dict, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    objects = IngestBatchQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "ingest batches"
        constraints = [
            models.UniqueConstraint(
                fields=["project", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="batch_idempotency_key",
            )
        ]
        indexes = [
            models.Index(
                fields=["received_at"],
                name="batch_pending",
                condition=Q(state="pending"),
            )
        ]

    def __str__(self) -> str:
        return f"batch {self.id} ({self.kind}, {self.state})"

    def enqueue(self) -> None:
        """Hand the batch to a worker once it is committed.

        If the broker cannot take the message the batch is still stored; the
        sweeper finds it pending and sends it again, so the request need not fail.
        """
        from telemetry.tasks import process_batch

        def send() -> None:
            try:
                process_batch.delay(self.id)
            except Exception:
                logger.exception("could not enqueue batch %s; the sweeper will retry", self.id)

        transaction.on_commit(send)
