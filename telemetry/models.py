from __future__ import annotations

import logging
import zlib
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.postgres.indexes import BrinIndex
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

    def claim_pending(
        self, kind: str, limit: int, max_bytes: int
    ) -> tuple[list[IngestBatch], bool]:
        """Lock the oldest pending batches of one kind that no other worker holds, for
        this transaction: at most `limit`, and no more than `max_bytes` of spooled
        (compressed) body after the first, so that small requests (one Sentry event, an
        exporter's few spans) share a transaction and large ones do not pile up in
        memory. Batches locked beyond the budget are released at the end of the
        transaction for the next round. Also says whether more are waiting."""
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
        return claimed, len(locked) > len(claimed) or len(locked) == limit

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
    """Requests counted per key (client address, project) and fixed window.

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
