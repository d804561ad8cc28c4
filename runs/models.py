from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.indexes import BrinIndex
from django.db import models
from django.db.models import Q
from django.db.models.functions import Greatest
from django.utils import timezone
from django.utils.text import slugify

TERMINAL_PHASES = frozenset({"DONE", "FAILED"})


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def default_runs_per_slug() -> int:
    return settings.RETENTION_RUNS_PER_SLUG


def default_max_age_days() -> int:
    return settings.RETENTION_MAX_AGE_DAYS


class Project(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=100, unique=True)
    public_key = models.CharField(max_length=32, unique=True, editable=False)
    allowed_origins = models.TextField(blank=True, help_text="One origin per line.")
    # New projects take the installation's defaults (RETENTION_* settings).
    retention_runs_per_slug = models.PositiveIntegerField(default=default_runs_per_slug)
    retention_max_age_days = models.PositiveIntegerField(default=default_max_age_days)
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if not self.slug:
            self.slug = slugify(self.name)[:100] or secrets.token_hex(4)
        if not self.public_key:
            self.public_key = secrets.token_hex(16)
        super().save(*args, **kwargs)

    def create_token(self, label: str = "") -> str:
        """Make a new ingest token. The plain value exists only in the return value."""
        token = "rl_" + secrets.token_urlsafe(32)
        self.tokens.create(token_hash=_hash_token(token), prefix=token[:7], label=label)
        return token

    def rotate_tokens(self) -> str:
        self.tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        return self.create_token(label="rotated")

    @classmethod
    def for_token(cls, token: str) -> Project | None:
        if not token:
            return None
        found = (
            ProjectToken.objects.filter(token_hash=_hash_token(token), revoked_at__isnull=True)
            .select_related("project")
            .first()
        )
        return found.project if found else None


class ProjectToken(models.Model):
    """A hashed ingest token: the plain value is shown once, at creation."""

    project = models.ForeignKey(Project, models.CASCADE, related_name="tokens")
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8)
    label = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.project})"


class RunQuerySet(models.QuerySet):
    def orphan_candidates(self, now: datetime | None = None) -> RunQuerySet:
        """Running, not cleanly exited, non-terminal phase, silent for too long.

        Silence is measured on the newest of the heartbeat and the last event:
        a run that streams events is alive even when its client sends no heartbeat.
        """
        now = now or timezone.now()
        cutoff = now - timedelta(seconds=settings.ORPHAN_AFTER_SECONDS)
        return (
            self.filter(status=Run.Status.RUNNING, exit_clean=False)
            .exclude(phase__in=TERMINAL_PHASES)
            .alias(alive_at=Greatest("last_heartbeat", "last_event_at", "started_at"))
            .filter(Q(alive_at__lt=cutoff) | Q(alive_at__isnull=True, created__lt=cutoff))
        )

    def mark_orphans(self, now: datetime | None = None) -> int:
        # One conditional UPDATE: two beat ticks or two workers never flip a run twice.
        return self.orphan_candidates(now).update(status=Run.Status.ORPHANED)


class Run(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CRASHED = "crashed"
        ORPHANED = "orphaned"
        CANCELLED = "cancelled"

    project = models.ForeignKey(Project, models.CASCADE, related_name="runs")
    run_id = models.CharField(max_length=128)
    slug = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.RUNNING)
    phase = models.CharField(max_length=64, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    host = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    exit_clean = models.BooleanField(default=False)
    exit_code = models.IntegerField(null=True, blank=True)
    parent = models.ForeignKey("self", models.SET_NULL, null=True, blank=True, related_name="forks")
    tags = models.JSONField(default=list, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    # Denormalised counters, updated once per ingested batch.
    events_count = models.BigIntegerField(default=0)
    errors_count = models.IntegerField(default=0)
    warnings_count = models.IntegerField(default=0)
    tokens_in = models.BigIntegerField(default=0)
    tokens_out = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    duration_ms = models.BigIntegerField(null=True, blank=True)
    last_seq = models.BigIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)

    objects = RunQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "run_id"], name="run_unique_per_project")
        ]
        indexes = [
            models.Index(fields=["project", "slug", "-id"], name="run_project_slug"),
            models.Index(fields=["slug", "-id"], name="run_slug"),
            models.Index(
                fields=["status"],
                name="run_active",
                condition=Q(status__in=["running", "orphaned"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.slug or '-'} {self.run_id}"

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.RUNNING

    def heartbeat(self, phase: str = "", pid: int | None = None, host: str = "") -> None:
        """A sign of life: refreshes the heartbeat and revives an orphaned run."""
        now = timezone.now()
        fields: dict = {"last_heartbeat": now}
        if phase:
            fields["phase"] = phase[:64]
        if pid is not None:
            fields["pid"] = pid
        if host:
            fields["host"] = host[:255]
        Run.objects.filter(pk=self.pk).update(**fields)
        Run.objects.filter(pk=self.pk, status=Run.Status.ORPHANED).update(status=Run.Status.RUNNING)
        self.refresh_from_db()

    def finish(self, status: str, at: datetime, exit_code: int | None = None) -> None:
        """Applied in memory by the ingest task; saved with the batch."""
        self.status = status
        self.finished_at = at
        if exit_code is not None:
            self.exit_code = exit_code
        if self.started_at:
            self.duration_ms = max(0, int((at - self.started_at).total_seconds() * 1000))


class Event(models.Model):
    """One structured record of a run. Append-only and high volume.

    No database-level foreign key: bulk loads skip the per-row FK check, and
    retention deletes events of a run explicitly before the run.
    """

    id = models.BigAutoField(primary_key=True)
    # (run, seq) covers lookups by run; no separate FK index to maintain on insert.
    run = models.ForeignKey(
        Run,
        models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="events",
    )
    ts = models.DateTimeField()
    seq = models.BigIntegerField()
    level = models.CharField(max_length=5, default="info")
    event = models.CharField(max_length=200)
    phase = models.CharField(max_length=64, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict)
    request_id = models.CharField(max_length=128, blank=True)
    trace_id = models.CharField(max_length=64, blank=True)
    span_id = models.CharField(max_length=32, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["run", "seq"], name="event_run_seq"),
            BrinIndex(fields=["ts"], name="event_ts_brin"),
        ]

    def __str__(self) -> str:
        return f"{self.event} #{self.seq}"

    def as_record(self) -> dict:
        """The Gitoma record shape: what `format=jsonl` and `logs --raw` print."""
        return {
            "ts": self.ts.isoformat(timespec="milliseconds"),
            "slug": self.run.slug,
            "phase": self.phase,
            "level": self.level,
            "event": self.event,
            "data": self.data,
        }
