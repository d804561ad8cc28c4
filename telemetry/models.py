from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.postgres.indexes import BrinIndex
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, models, transaction
from django.db.models import F, Q
from django.db.models.functions import TruncHour
from django.utils import timezone
from isal import isal_zlib

from portal.db import fetch_all_bytes, fetch_bytes, server_bound_cursor
from runs.models import Project

logger = logging.getLogger(__name__)


class IngestBatchQuerySet(models.QuerySet):
    def claim(self, batch_id: int) -> IngestBatch | None:
        """Lock a pending batch for this transaction, or None: done already, or another
        worker holds it right now (skip_locked), so two workers never store it twice."""
        return (
            # of=self: lock only the batch row. Locking the joined project row too
            # would make a second worker skip every other batch of the same project.
            self.select_for_update(skip_locked=True, of=("self",))
            .select_related("project")
            .defer("body")
            .filter(pk=batch_id, state=IngestBatch.State.PENDING)
            .first()
        )

    def claim_pending(self, kind: str, limit: int, max_bytes: int) -> list[IngestBatch]:
        """Lock the oldest pending batches of one kind that no other worker holds, for
        this transaction: at most `limit`, and no more than `max_bytes` of spooled
        (compressed) body after the first, so that small requests (one Sentry event, an
        exporter's few spans) share a transaction and large ones do not pile up in
        memory. Batches locked beyond the budget are released at the end of the
        transaction for the next round."""
        locked = list(
            self.select_for_update(skip_locked=True, of=("self",))
            .select_related("project")
            .defer("body")
            .filter(kind=kind, state=IngestBatch.State.PENDING)
            .annotate(body_bytes=models.Func(F("body"), function="octet_length"))
            .order_by("id")[:limit]
        )
        claimed, total = [], 0
        for batch in locked:
            total += batch.body_bytes or 0
            if claimed and total > max_bytes:
                break
            claimed.append(batch)
        return claimed

    def pending_after(self, kind: str, batch_id: int) -> bool:
        """Whether a batch of `kind` newer than `batch_id` waits (another worker may
        hold it: a hint, not a claim)."""
        return self.filter(kind=kind, state=IngestBatch.State.PENDING, id__gt=batch_id).exists()

    def mark_done(self, batches: list[IngestBatch], stored: list[int]) -> None:
        """Several batches stored in this transaction: one statement (see
        IngestBatch.mark_done for one)."""
        with connection.cursor() as cursor:
            cursor.execute(
                _MARK_DONE_SQL,
                [timezone.now(), [b.pk for b in batches], [int(n) for n in stored]],
            )

    def record_failure(self, batch_id: int, exc: Exception) -> None:
        """Count a failed attempt (nothing of the batch was stored); the sweeper retries
        it, and gives up after MAX_ATTEMPTS."""
        pending = self.filter(pk=batch_id, state=IngestBatch.State.PENDING)
        pending.update(attempts=F("attempts") + 1, error=f"{type(exc).__name__}: {exc}"[:2000])
        pending.filter(attempts__gte=IngestBatch.MAX_ATTEMPTS).update(
            state=IngestBatch.State.FAILED
        )

    def backlog(self) -> list[tuple[int, int, int, datetime]]:
        """(project id, batches, spooled bytes, oldest received_at) of every project with
        pending batches: what backpressure weighs (telemetry/ingest/backlog.py).

        Reads only the pending rows (the partial index `batch_pending`), whose number the
        bound itself keeps small; `octet_length` of a stored body is read from its
        header, without decompressing or fetching it from TOAST."""
        with connection.cursor() as cursor:
            cursor.execute(_BACKLOG_SQL)
            return cursor.fetchall()

    def stale_pending(self, older_than: int | None = None, limit: int = 1000) -> list[int]:
        """Ids of batches pending for longer than a worker should need."""
        seconds = older_than if older_than is not None else settings.SWEEP_PENDING_AFTER_SECONDS
        cutoff = timezone.now() - timedelta(seconds=seconds)
        return list(
            self.filter(state=IngestBatch.State.PENDING, received_at__lt=cutoff)
            .order_by("received_at")
            .values_list("id", flat=True)[:limit]
        )


_BACKLOG_SQL = """
SELECT project_id, count(*), coalesce(sum(octet_length(body)), 0)::bigint, min(received_at)
FROM telemetry_ingestbatch WHERE state = 'pending'
GROUP BY project_id
"""

_MARK_DONE_SQL = """
UPDATE telemetry_ingestbatch AS b
SET state = 'done', processed_at = %s, attempts = b.attempts + 1, error = '', body = '',
    summary = b.summary || jsonb_build_object('stored', v.stored)
FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, stored)
WHERE b.id = v.id
"""


class IngestBatch(models.Model):
    """The durable spool: one accepted request body, kept until a worker has processed it.

    A request is answered only after its row is committed, so a 202 never claims
    data that was not stored. Workers claim rows by state; the partial index keeps
    the pending ones cheap to find however large the table grows.
    """

    MAX_ATTEMPTS = 5

    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    class Kind(models.TextChoices):
        EVENTS = "events"
        METRICS = "metrics"
        OTLP_LOGS = "otlp_logs"
        OTLP_METRICS = "otlp_metrics"
        OTLP_TRACES = "otlp_traces"
        SENTRY = "sentry"

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, models.CASCADE, related_name="batches")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.EVENTS)
    received_at = models.DateTimeField(default=timezone.now)
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    # The already size-checked body, compressed (gzip bodies as sent, others zlib);
    # `params` holds query parameters that change its meaning (the default run_id).
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

    @classmethod
    def spool(
        cls,
        project: Project,
        body: bytes,
        *,
        kind: str = Kind.EVENTS,
        encoding: str = "",
        raw: list[bytes] | None = None,
        params: dict | None = None,
        idempotency_key: str | None = None,
        request_id: str = "",
        summary: dict | None = None,
        received_at: datetime | None = None,
    ) -> IngestBatch:
        """Store an accepted request body durably and hand it to a worker once committed.

        `body` is the decompressed body; `raw` the bytes as received with `encoding`
        (see pack_body for what is kept).

        Every ingest endpoint answers only after this returns. With an Idempotency-Key,
        a retry racing the first request may have stored the key a moment earlier: that
        request's batch is returned and nothing is stored twice.
        """
        fields = {
            "project": project,
            "kind": kind,
            "body": pack_body(body, encoding, raw),
            "params": params or {},
            "idempotency_key": idempotency_key,
            "request_id": request_id,
            "summary": summary or {},
        }
        if received_at is not None:
            fields["received_at"] = received_at
        batch = cls(**fields)
        try:
            if connection.in_atomic_block:
                with transaction.atomic():
                    batch._insert_bound()
                    batch.enqueue()
            else:
                # One statement needs no transaction of its own: in autocommit the
                # INSERT commits (and waits for the WAL flush) by itself, two round
                # trips fewer than BEGIN … COMMIT for every request; the batch is
                # committed when enqueue() hands it on.
                batch._insert_bound()
                batch.enqueue()
        except IntegrityError:
            if idempotency_key is None:
                raise
            return cls.objects.get(project=project, idempotency_key=idempotency_key)
        return batch

    def _insert_bound(self) -> None:
        """INSERT this new batch as `save()` would, with its body bound as binary
        (see portal.db.server_bound_cursor)."""
        fields = [f for f in self._meta.concrete_fields if not f.primary_key]
        values = [f.get_db_prep_save(f.pre_save(self, True), connection) for f in fields]
        qn = connection.ops.quote_name
        sql = (
            f"INSERT INTO {qn(self._meta.db_table)} ({', '.join(qn(f.column) for f in fields)})"
            f" VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {qn(self._meta.pk.column)}"
        )
        with server_bound_cursor() as cursor:
            cursor.execute(sql, values)
            self.pk = cursor.fetchone()[0]
        self._state.adding = False
        self._state.db = connection.alias

    def read_body(self) -> bytes:
        """The request body as the receiver judged it, decompressed.

        Read in binary (portal.db.fetch_bytes). zlib's auto-detection reads both what
        `spool` compressed and gzip bodies kept as sent, every member of them.
        """
        data = fetch_bytes(
            f"SELECT body FROM {connection.ops.quote_name(self._meta.db_table)} WHERE id = %s",
            [self.pk],
        )
        return unpack_body(data or b"")

    @classmethod
    def read_bodies(cls, batches: list[IngestBatch]) -> list[bytes]:
        """The bodies of several batches (read_body for each), in one query."""
        rows = fetch_all_bytes(
            f"SELECT id, body FROM {connection.ops.quote_name(cls._meta.db_table)}"
            " WHERE id = ANY(%s)",
            [[b.pk for b in batches]],
        )
        return [unpack_body(rows.get(b.pk) or b"") for b in batches]

    def enqueue(self) -> None:
        """Hand the batch to a worker once it is committed (telemetry/ingest/wakeup.py).

        If the broker cannot take the message the batch is still stored; the
        sweeper finds it pending and sends it again, so the request need not fail.
        """

        def committed() -> None:
            # The wake-up imports the task module, which imports this one.
            from telemetry.ingest.wakeup import batch_committed

            try:
                batch_committed(self.id, self.kind)
            except Exception:
                logger.exception("could not enqueue batch %s; the sweeper will retry", self.id)

        transaction.on_commit(committed)

    def mark_done(self, stored: int) -> None:
        """The batch's rows are the record now: keep the spool small."""
        self.state = IngestBatch.State.DONE
        self.processed_at = timezone.now()
        self.attempts += 1
        self.error = ""
        self.body = b""
        self.summary = {**self.summary, "stored": stored}
        self.save(update_fields=["state", "processed_at", "attempts", "error", "body", "summary"])


def pack_body(body: bytes, encoding: str, raw: list[bytes] | None) -> bytes:
    """What the spool keeps of a judged body: a gzip body as it came (`raw`), anything
    else zlib-compressed at level 1 (compressing megabytes again would cost the request
    more than judging them)."""
    if raw and encoding.strip().lower() in ("gzip", "x-gzip"):
        return b"".join(raw)
    return zlib.compress(body, 1)


def unpack_body(data: bytes) -> bytes:
    """The body pack_body kept: zlib's auto-detection reads both forms, and every member
    of a multi-member gzip body, as portal.http.read_body read it."""
    parts = []
    while data:
        # ISA-L inflates ~3x faster than zlib; the body was checked by the request.
        decompressor = isal_zlib.decompressobj(32 + zlib.MAX_WBITS)
        parts.append(decompressor.decompress(data))
        data = decompressor.unused_data
    return b"".join(parts)


class ProjectLimits(models.Model):
    """Per-project overrides of installation-wide limits.

    Kept here rather than on Project so the limits can evolve with the ingest
    endpoints that enforce them. A project without a row uses the settings.
    """

    project = models.OneToOneField(Project, models.CASCADE, related_name="limits")
    ingest_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text=(
            "Write requests per minute on the token endpoints (429 beyond). "
            "Empty: the INGEST_RATE_PER_MINUTE setting. 0: unlimited."
        ),
    )

    class Meta:
        verbose_name = "project limits"
        verbose_name_plural = "project limits"

    def __str__(self) -> str:
        return f"limits of {self.project}"


class RateCounter(models.Model):
    """Requests counted per key (client address, project) and 5-second slot.

    Shared by every web process through PostgreSQL, so no extra server is
    needed. The table is UNLOGGED (see the migration): losing counters in a
    crash only forgives a minute of traffic, and skipping the WAL makes the
    one upsert per request cheaper.
    """

    key = models.CharField(max_length=200)
    window_start = models.BigIntegerField(help_text="Epoch seconds the window starts at.")
    hits = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["key", "window_start"], name="ratecounter_key_window")
        ]

    def __str__(self) -> str:
        return f"{self.key} @{self.window_start}: {self.hits}"


class ErrorGroupQuerySet(models.QuerySet):
    def set_status(self, status: str) -> int:
        """Triage many groups at once (admin actions, the detail page's buttons).

        Resolving or reopening by hand clears `regressed`: an operator has looked.
        """
        now = timezone.now()
        fields: dict = {"status": status, "regressed": False}
        fields["resolved_at"] = now if status == ErrorGroup.Status.RESOLVED else None
        return self.update(**fields)

    def search(self, text: str) -> ErrorGroupQuerySet:
        if not text:
            return self
        return self.filter(Q(title__icontains=text) | Q(culprit__icontains=text))

    def with_reports(self, **lookups) -> ErrorGroupQuerySet:
        """Groups with at least one report matching `lookups` (release, environment,
        run__run_id): an EXISTS, so a group with many such reports is listed once."""
        if not lookups:
            return self
        reports = ErrorReport.objects.filter(group=models.OuterRef("pk"), **lookups)
        return self.filter(models.Exists(reports))

    def newest_seen_first(self, after: tuple[datetime, int] | None = None) -> ErrorGroupQuerySet:
        """Keyset order of the read API: `last_seen` then id, both descending; `after`
        is the (last_seen, id) of the previous page's last group."""
        groups = self.order_by("-last_seen", "-id")
        if after is not None:
            seen, pk = after
            groups = groups.filter(Q(last_seen__lt=seen) | Q(last_seen=seen, id__lt=pk))
        return groups


class ErrorGroup(models.Model):
    """One bug: every report with the same fingerprint in a project (docs/errors.md)."""

    class Status(models.TextChoices):
        UNRESOLVED = "unresolved"
        RESOLVED = "resolved"
        IGNORED = "ignored"

    project = models.ForeignKey(Project, models.CASCADE, related_name="error_groups")
    fingerprint = models.CharField(max_length=64)
    title = models.CharField(max_length=255)
    culprit = models.CharField(max_length=255, blank=True)
    level = models.CharField(max_length=8, default="error")
    source = models.CharField(max_length=16, default="frontend")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.UNRESOLVED)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    count = models.BigIntegerField(default=0)
    regressed = models.BooleanField(default=False)
    resolved_at = models.DateTimeField(null=True, blank=True)

    objects = ErrorGroupQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project", "fingerprint"], name="errorgroup_project_fingerprint"
            )
        ]
        indexes = [
            models.Index(fields=["status", "-last_seen"], name="errorgroup_status_seen"),
            # A project's issues, newest first (GET /api/errors, the errors page).
            models.Index(fields=["project", "-last_seen"], name="errorgroup_project_seen"),
        ]

    def __str__(self) -> str:
        return self.title

    def set_status(self, status: str) -> None:
        ErrorGroup.objects.filter(pk=self.pk).set_status(status)
        self.refresh_from_db()


class ErrorReportQuerySet(models.QuerySet):
    def groups_of_run(self, run, limit: int = 10) -> list[dict]:
        """The error groups a run fed, most occurrences first, in one query: its page's
        Errors section (the run's error-level events and crash become reports)."""
        return list(
            self.filter(run=run)
            .values("group_id", "group__title", "group__status", "group__culprit")
            .annotate(n=models.Count("id"), last=models.Max("received_at"))
            .order_by("-n", "-last")[:limit]
        )

    def affected(self, group_ids: list[int]) -> dict[int, dict[str, int]]:
        """Distinct users (visitors), page URLs and runs per group, in one query."""
        rows = (
            self.filter(group_id__in=group_ids)
            .values("group_id")
            .annotate(
                users=models.Count("visitor", distinct=True, filter=~Q(visitor="")),
                urls=models.Count("url", distinct=True, filter=~Q(url="")),
                runs=models.Count("run", distinct=True),
            )
        )
        return {row.pop("group_id"): row for row in rows}

    def hourly(
        self, group_ids: list[int], now: datetime, hours: int = 24
    ) -> tuple[datetime, dict[int, list[int]]]:
        """Reports per hour and group over the last `hours` hours (the current one last)."""
        start = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
        rows = (
            self.filter(group_id__in=group_ids, received_at__gte=start)
            .annotate(hour=TruncHour("received_at"))
            .values("group_id", "hour")
            .annotate(n=models.Count("id"))
        )
        counts = {group_id: [0] * hours for group_id in group_ids}
        for row in rows:
            index = int((row["hour"] - start).total_seconds() // 3600)
            if 0 <= index < hours:
                counts[row["group_id"]][index] = row["n"]
        return start, counts

    def newest_first(self, after: tuple[datetime, int] | None = None) -> ErrorReportQuerySet:
        """Keyset order of the read API: `received_at` then id, both descending (a Sentry
        report is received at its event's own timestamp, so ids alone are not in time
        order); `client_run_id` is the run's own id, from the same query."""
        reports = self.annotate(client_run_id=F("run__run_id")).order_by("-received_at", "-id")
        if after is not None:
            moment, pk = after
            reports = reports.filter(Q(received_at__lt=moment) | Q(received_at=moment, id__lt=pk))
        return reports


class ErrorReport(models.Model):
    """One occurrence of an error: a beacon, an error-level agent event, a Sentry event."""

    class Source(models.TextChoices):
        FRONTEND = "frontend"
        EVENT = "event"
        SENTRY = "sentry"

    id = models.BigAutoField(primary_key=True)
    group = models.ForeignKey(ErrorGroup, models.CASCADE, related_name="reports")
    project = models.ForeignKey(Project, models.CASCADE, related_name="+")
    source = models.CharField(max_length=16, choices=Source.choices)
    level = models.CharField(max_length=8, default="error")
    message = models.TextField(blank=True)
    error = models.TextField(blank=True)
    stack = models.TextField(blank=True)
    context = models.JSONField(default=dict, blank=True)
    # Page address without its query (for "URLs affected") and an opaque visitor
    # key (for "users affected"); both also live in `context` as sent.
    url = models.CharField(max_length=500, blank=True)
    visitor = models.CharField(max_length=64, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    run = models.ForeignKey(
        "runs.Run", models.SET_NULL, null=True, blank=True, related_name="error_reports"
    )
    event_seq = models.BigIntegerField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)
    # Sentry events: the client's event id (stored once per project), release and
    # environment (filters, counts), and the whole event as stored, for the detail page.
    event_id = models.CharField(max_length=32, blank=True)
    release = models.CharField(max_length=200, blank=True)
    environment = models.CharField(max_length=64, blank=True)
    event = models.JSONField(default=dict, blank=True)

    objects = ErrorReportQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project", "event_id"],
                condition=~Q(event_id=""),
                name="errorreport_project_event_id",
            )
        ]
        indexes = [
            models.Index(fields=["group", "-received_at"], name="errorreport_group_recent"),
            BrinIndex(fields=["received_at"], name="errorreport_received_brin"),
        ]

    def __str__(self) -> str:
        return f"report {self.id} of group {self.group_id}"


class EnvelopeItemCount(models.Model):
    """Sentry envelope items Runlens does not store (sessions, client reports,
    attachments, profiles, replays, types to come), counted per project and type:
    skipped, never fatal, and visible on /status."""

    project = models.ForeignKey(Project, models.CASCADE, related_name="+")
    item_type = models.CharField(max_length=64)
    count = models.BigIntegerField(default=0)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "item_type"], name="envelopeitem_type")
        ]

    def __str__(self) -> str:
        return f"{self.item_type}: {self.count}"


class Span(models.Model):
    """One OTLP span. Spans arrive in any order, across requests, parents after children:
    the tree is rebuilt at read time from `parent_span_id`, never linked by a key.
    """

    class Kind(models.IntegerChoices):
        UNSPECIFIED = 0
        INTERNAL = 1
        SERVER = 2
        CLIENT = 3
        PRODUCER = 4
        CONSUMER = 5

    class StatusCode(models.IntegerChoices):
        UNSET = 0
        OK = 1
        ERROR = 2

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, models.CASCADE, related_name="spans")
    run = models.ForeignKey(
        "runs.Run",
        models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        null=True,
        blank=True,
        related_name="spans",
    )
    trace_id = models.CharField(max_length=32, help_text="32 lowercase hex digits")
    span_id = models.CharField(max_length=16, help_text="16 lowercase hex digits")
    parent_span_id = models.CharField(max_length=16, blank=True)
    name = models.CharField(max_length=200)
    kind = models.PositiveSmallIntegerField(choices=Kind.choices, default=Kind.UNSPECIFIED)
    service = models.CharField(max_length=200, blank=True)
    start_time = models.DateTimeField()
    end_time = models.DateTimeField()
    duration_ms = models.FloatField()
    status_code = models.PositiveSmallIntegerField(
        choices=StatusCode.choices, default=StatusCode.UNSET
    )
    status_message = models.TextField(blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    resource = models.JSONField(default=dict, blank=True)
    # Span events: [{"name", "time", "attributes"}], as sent.
    events = models.JSONField(default=list, blank=True)

    class Meta:
        constraints = [
            # An exporter's retry of the same request stores nothing twice.
            models.UniqueConstraint(
                fields=["project", "trace_id", "span_id"], name="span_unique_per_trace"
            )
        ]
        indexes = [
            models.Index(fields=["run", "start_time"], name="span_run_start"),
            models.Index(fields=["project", "name", "start_time"], name="span_project_name"),
            BrinIndex(fields=["start_time"], name="span_start_brin"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.span_id})"


# --- Alerts (docs/alerts.md) ----------------------------------------------------------


class RefusalCount(models.Model):
    """Write requests answered 429 per project and minute: what the `rate_limited` alert
    counts. RateCounter cannot serve: it is unlogged and purged every few minutes.
    One upsert per refused request, only when a request is refused (ratelimit.hit_project)."""

    project = models.ForeignKey(Project, models.CASCADE, related_name="+")
    minute = models.DateTimeField()
    refused = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "minute"], name="refusalcount_minute")
        ]

    def __str__(self) -> str:
        return f"{self.refused} refused at {self.minute:%Y-%m-%d %H:%M}"


class SlugErrorCount(models.Model):
    """Error-level events per project, slug and minute: the slug-scoped `error_events`
    and `error_rate_above_baseline` alerts read these instead of the events. Kept by
    the worker next to EventCount, one upsert per batch that holds errors."""

    project = models.ForeignKey(Project, models.CASCADE, related_name="+")
    slug = models.CharField(max_length=200)
    minute = models.DateTimeField()
    errors = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project", "slug", "minute"], name="slugerrorcount_minute"
            )
        ]

    def __str__(self) -> str:
        return f"{self.errors} errors of {self.slug} at {self.minute:%Y-%m-%d %H:%M}"


class AlertChannel(models.Model):
    """Where alert messages go. The outcome of the newest delivery is kept here and shown
    on /alerts and in the admin, so a broken channel never fails silently."""

    class Kind(models.TextChoices):
        WEBHOOK = "webhook"
        SLACK = "slack"
        DISCORD = "discord"
        EMAIL = "email"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    url = models.URLField(max_length=2000, blank=True, help_text="webhook, slack, discord")
    to = models.TextField(blank=True, help_text="email: addresses, one per line or comma")
    headers = models.JSONField(
        default=dict, blank=True, help_text="Extra HTTP headers (webhook): {name: value}."
    )
    enabled = models.BooleanField(default=True)
    max_per_hour = models.PositiveIntegerField(
        default=60, help_text="Messages per hour at most; beyond, they are dropped and noted."
    )
    # The newest delivery: success, or the error (status and the first 1 KB of the answer).
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_error_status = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # The hourly cap: messages sent in the hour that started at `hour_start`.
    hour_start = models.DateTimeField(null=True, blank=True)
    hour_count = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        problem = self.problem()
        if problem:
            raise ValidationError(problem)

    def problem(self) -> str:
        """What keeps this channel from working, or "" (the admin and `alerts import`)."""
        if self.kind not in self.Kind.values:
            return f"kind must be one of {', '.join(self.Kind.values)}"
        if self.kind == self.Kind.EMAIL:
            if not self.recipients():
                return "an email channel needs `to` (one address or more)"
            bad = [a for a in self.recipients() if "@" not in a or any(c in a for c in "\r\n<>")]
            if bad:
                return f"not an email address: {bad[0]!r}"
            return ""
        if not self.url.startswith(("http://", "https://")):
            return f"a {self.kind} channel needs `url` (http:// or https://)"
        if not isinstance(self.headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "\n" not in k + v and "\r" not in k + v
            for k, v in self.headers.items()
        ):
            return "`headers` must map names to values, all strings on one line"
        return ""

    def recipients(self) -> list[str]:
        return [a.strip() for a in self.to.replace("\n", ",").split(",") if a.strip()]

    @property
    def target(self) -> str:
        """Where it sends, safe to show: the scheme and host of a URL (the path of a Slack
        or Discord webhook is its secret), or the addresses."""
        if self.kind == self.Kind.EMAIL:
            return ", ".join(self.recipients())
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}"

    def take_hourly_slot(self, now: datetime) -> bool:
        """Count one message against the hourly cap, atomically; False when the cap is
        reached (the message is dropped and the drop noted as the channel's error)."""
        hour = now.replace(minute=0, second=0, microsecond=0)
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE telemetry_alertchannel SET"
                " hour_count = CASE WHEN hour_start = %s THEN hour_count + 1 ELSE 1 END,"
                " hour_start = %s"
                " WHERE id = %s AND (hour_start IS DISTINCT FROM %s OR hour_count < max_per_hour)",
                [hour, hour, self.pk, hour],
            )
            return cursor.rowcount == 1

    def note_success(self, now: datetime) -> None:
        AlertChannel.objects.filter(pk=self.pk).update(last_success_at=now)

    def note_error(self, now: datetime, status: int | None, text: str) -> None:
        AlertChannel.objects.filter(pk=self.pk).update(
            last_error_at=now, last_error_status=status, last_error=text[:1024]
        )

    @property
    def healthy(self) -> bool:
        """Its newest delivery succeeded (or none failed yet)."""
        if self.last_error_at is None:
            return True
        return self.last_success_at is not None and self.last_success_at > self.last_error_at


class Condition(models.TextChoices):
    ERROR_EVENTS = "error_events"
    NEW_ERROR_GROUP = "new_error_group"
    ERROR_GROUP_REGRESSED = "error_group_regressed"
    RUN_ORPHANED = "run_orphaned"
    RUN_FAILED = "run_failed"
    RATE_LIMITED = "rate_limited"
    COST_OVER = "cost_over"
    NO_RUNS = "no_runs"
    INGEST_BACKLOG = "ingest_backlog"
    ERROR_RATE_ABOVE_BASELINE = "error_rate_above_baseline"


@dataclass(frozen=True)
class ConditionKeys:
    """Which rule keys a condition reads (docs/alerts.md)."""

    threshold: bool = False
    window: bool = False
    slug: bool = True  # may be narrowed to one slug
    unit: str = ""


CONDITION_KEYS: dict[str, ConditionKeys] = {
    Condition.ERROR_EVENTS: ConditionKeys(threshold=True, window=True, unit="error events"),
    Condition.NEW_ERROR_GROUP: ConditionKeys(),
    Condition.ERROR_GROUP_REGRESSED: ConditionKeys(slug=False),
    Condition.RUN_ORPHANED: ConditionKeys(),
    Condition.RUN_FAILED: ConditionKeys(),
    Condition.RATE_LIMITED: ConditionKeys(
        threshold=True, window=True, slug=False, unit="answers 429"
    ),
    Condition.COST_OVER: ConditionKeys(threshold=True, unit="USD today (UTC)"),
    Condition.NO_RUNS: ConditionKeys(window=True),
    Condition.INGEST_BACKLOG: ConditionKeys(threshold=True, slug=False, unit="s"),
    Condition.ERROR_RATE_ABOVE_BASELINE: ConditionKeys(threshold=True, unit="% above baseline"),
}


class AlertRule(models.Model):
    """One alert: a condition on a project (optionally one slug), the channels it
    notifies and how often at most (docs/alerts.md). Edited in the admin or
    round-tripped through `manage.py alerts import/export`."""

    name = models.CharField(max_length=200, unique=True)
    project = models.ForeignKey(Project, models.CASCADE, related_name="alert_rules")
    slug = models.CharField(max_length=200, blank=True, help_text="Empty: every slug.")
    condition = models.CharField(max_length=32, choices=Condition.choices)
    threshold = models.FloatField(null=True, blank=True)
    window_minutes = models.PositiveIntegerField(null=True, blank=True)
    cooldown_minutes = models.PositiveIntegerField(
        default=30, help_text="One message per subject in this time at most."
    )
    channels = models.ManyToManyField(AlertChannel, related_name="rules", blank=True)
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)
    # new_error_group reads groups above `cursor`; `cursor_next` becomes the cursor one
    # round later, so a group committed late by a slower worker is still seen.
    cursor = models.BigIntegerField(default=0)
    cursor_next = models.BigIntegerField(default=0)
    # error_rate_above_baseline: the week's hourly mean, computed once per clock hour.
    baseline = models.FloatField(null=True, blank=True)
    baseline_hour = models.DateTimeField(null=True, blank=True)
    # The alerting's own health: the newest evaluation and its error, the newest message.
    last_evaluated_at = models.DateTimeField(null=True, blank=True)
    last_eval_error = models.TextField(blank=True)
    last_fired_at = models.DateTimeField(null=True, blank=True)
    last_delivery_at = models.DateTimeField(null=True, blank=True)
    last_delivery_error = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        if self._state.adding:
            self.prime()
        super().save(*args, **kwargs)

    @property
    def keys(self) -> ConditionKeys:
        return CONDITION_KEYS.get(self.condition, ConditionKeys())

    def clean(self) -> None:
        problem = self.problem()
        if problem:
            raise ValidationError(problem)

    def problem(self) -> str:
        """What makes this rule meaningless, or "" (the admin and `alerts import`)."""
        if self.condition not in CONDITION_KEYS:
            return f"condition must be one of {', '.join(CONDITION_KEYS)}"
        keys = self.keys
        if keys.threshold and self.threshold is None:
            return f"{self.condition} needs a threshold ({keys.unit})"
        if self.threshold is not None and (self.threshold != self.threshold or self.threshold < 0):
            return "threshold must be a number >= 0"
        if keys.window and not self.window_minutes:
            return f"{self.condition} needs window_minutes (1 or more)"
        if self.slug and not keys.slug:
            return f"{self.condition} is per project: leave slug empty (null)"
        return ""

    def prime(self) -> None:
        """Start from now: groups that exist already are not new to this rule."""
        top = ErrorGroup.objects.aggregate(top=models.Max("id"))["top"] or 0
        self.cursor = self.cursor_next = top

    def restart(self) -> None:
        """What the rule watches changed (condition, project, slug): forget its states."""
        self.prime()
        self.created = timezone.now()
        self.baseline = self.baseline_hour = None
        self.states.all().delete()

    @property
    def cooldown(self) -> timedelta:
        return timedelta(minutes=self.cooldown_minutes)

    @property
    def firing(self) -> bool:
        return any(s.state == AlertState.State.FIRING for s in self.states.all())


class AlertState(models.Model):
    """What a rule knows about one subject (a slug, a run, an error group, the project):
    firing or ok, since when, and whether this episode was notified (cooldown)."""

    class State(models.TextChoices):
        OK = "ok"
        FIRING = "firing"

    rule = models.ForeignKey(AlertRule, models.CASCADE, related_name="states")
    subject = models.CharField(max_length=300)
    label = models.CharField(max_length=300, blank=True)
    slug = models.CharField(max_length=200, blank=True)
    path = models.CharField(max_length=600, blank=True, help_text="portal page of the subject")
    state = models.CharField(max_length=8, choices=State.choices, default=State.OK)
    value = models.FloatField(null=True, blank=True)
    since = models.DateTimeField(default=timezone.now)
    notified = models.BooleanField(default=False, help_text="this episode's message went out")
    last_notified_at = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "subject"], name="alertstate_rule_subject")
        ]

    def __str__(self) -> str:
        return f"{self.rule}: {self.label or self.subject} {self.state}"


class WorkerHeartbeat(models.Model):
    """One row per Celery worker (its node name, `celery@host`): what `/status` shows as
    the workers seen. In PostgreSQL rather than in files, so a web process on any host
    sees the workers of every host (docs/deploy.md)."""

    hostname = models.CharField(max_length=200, unique=True)
    pid = models.IntegerField(default=0)
    queues = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField()
    seen_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.hostname


class JobRun(models.Model):
    """The last run of a housekeeping job (e.g. `retention`): when it ended and what it did,
    one row per job, for the status page."""

    job = models.CharField(max_length=50, unique=True)
    finished_at = models.DateTimeField()
    result = models.JSONField(default=dict)

    def __str__(self) -> str:
        return self.job
