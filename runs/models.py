from __future__ import annotations

import fnmatch
import hashlib
import mimetypes
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache

import orjson
from django.conf import settings
from django.contrib.postgres.indexes import BrinIndex, GinIndex
from django.db import connection, models
from django.db.models import Case, Count, F, Func, Q, Value, When
from django.db.models.functions import Concat, Greatest
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from runs.diffs import Diff, parse_unified_diff

TERMINAL_PHASES = frozenset({"DONE", "FAILED"})
# The one level table. Stored levels, in order (a level filter is a minimum) …
LEVELS = ("debug", "info", "warn", "error")
# … and the names clients use for them (Gitoma records, OTLP severity text, the
# browser console's `log`, Sentry's `fatal`), matched as sent, then lowered.
LEVEL_ALIASES = {
    "debug": "debug",
    "trace": "debug",
    "info": "info",
    "log": "info",
    "notice": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "err": "error",
    "fatal": "error",
    "critical": "error",
}


def run_id_problem(run_id: str) -> str | None:
    """Why a client's run id cannot be kept, or None.

    Every run is read at `/api/runs/<run_id>` and `/runs/<run_id>/`: an id holding a
    `/` (or `.`/`..`, which clients resolve away) could be stored but never read back,
    so such ids are refused where they come in (docs/decisions.md).
    """
    if len(run_id) > 128:
        return "longer than 128 characters"
    if "/" in run_id:
        return "must not contain '/' (run ids are part of URLs); use another separator"
    if run_id in (".", ".."):
        return "must not be '.' or '..' (run ids are part of URLs)"
    return None


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

    @property
    def dsn(self) -> str:
        """The Sentry DSN of the project: `<scheme>://<public key>@<host>/<project id>`,
        the host from RUNLENS_URL (docs/sentry.md)."""
        scheme, _, rest = settings.RUNLENS_URL.partition("://")
        return f"{scheme}://{self.public_key}@{rest}/{self.pk}"

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
        return cls._one(
            "WHERE id = (SELECT project_id FROM runs_projecttoken"
            " WHERE token_hash = %s AND revoked_at IS NULL)",
            [_hash_token(token)],
        )

    @classmethod
    def by_id(cls, pk: int) -> Project | None:
        return cls._one("WHERE id = %s", [pk])

    @classmethod
    def _one(cls, where: str, params: list) -> Project | None:
        """The project a condition finds, in SQL written once. Every ingest request
        authenticates this way, and compiling the same query with the ORM each time
        cost more CPU than the rest of authenticating (docs/performance.md)."""
        fields = cls._meta.concrete_fields
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {columns} FROM {cls._meta.db_table} {where}", params)
            row = cursor.fetchone()
        if row is None:
            return None
        return cls.from_db(connection.alias, [f.attname for f in fields], row)


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


# Runs the OTLP receiver opens for items that name no run (telemetry/otlp/mapping.py, docs/otlp.md):
# one per trace (`trace-<32 hex>`) or per service and UTC day (`<service>@YYYY-MM-DD`).
# No process stands behind them, so nothing ever exits them cleanly: silence is not death.
SYNTHETIC_RUN_IDS = Q(run_id__regex=r"^trace-[0-9a-f]{32}$") | Q(
    run_id__regex=r"^[^/]{1,100}@[0-9]{4}-[0-9]{2}-[0-9]{2}$"
)


# A run that showed one of these promised signs of life: its silence means it died.
LIVENESS_SIGNALS = Q(watched=True) | Q(last_heartbeat__isnull=False) | Q(pid__isnull=False)


class RunQuerySet(models.QuerySet):
    def orphan_candidates(self, now: datetime | None = None) -> RunQuerySet:
        """Running, not cleanly exited, non-terminal phase, silent for too long.

        Silence is measured on the newest of the heartbeat and the last event:
        a run that streams events is alive even when its client sends no heartbeat.
        Only runs that promised signs of life are candidates (`watched`: a heartbeat,
        a pid or `run.begin`); a run known only from OTLP records and spans has no
        process behind it to die, and synthetic OTLP runs (SYNTHETIC_RUN_IDS) never do.
        """
        now = now or timezone.now()
        cutoff = now - timedelta(seconds=settings.ORPHAN_AFTER_SECONDS)
        return (
            self.filter(status=Run.Status.RUNNING, exit_clean=False)
            .filter(LIVENESS_SIGNALS)
            .exclude(phase__in=TERMINAL_PHASES)
            .exclude(SYNTHETIC_RUN_IDS)
            .alias(alive_at=Greatest("last_heartbeat", "last_event_at", "started_at"))
            .filter(Q(alive_at__lt=cutoff) | Q(alive_at__isnull=True, created__lt=cutoff))
        )

    def orphans(self, now: datetime | None = None) -> RunQuerySet:
        """Runs an operator must look at: marked orphaned, or silent enough to be marked soon.

        The second half covers the up to 30 s until beat's next `mark_orphans`.
        """
        candidates = self.orphan_candidates(now).values("pk")
        # status__in first: it matches the partial index `run_active`, so the cost
        # follows the number of live runs, not the size of the table.
        live = self.filter(status__in=[Run.Status.RUNNING, Run.Status.ORPHANED])
        return live.filter(Q(status=Run.Status.ORPHANED) | Q(pk__in=candidates))

    def dead_on_this_host(self) -> list[int]:
        """Running runs whose reported pid is gone, for runs on the machine we run on.

        SPEC §7's "pid known dead on its host": when an agent runs on the same host
        as the portal (or a worker), the kernel can tell at once that its process is
        gone, long before 90 s of silence. Other hosts' pids mean nothing here.
        """
        hosts = {socket.gethostname(), socket.getfqdn()}
        live = (
            self.filter(status=Run.Status.RUNNING, exit_clean=False, host__in=hosts)
            .filter(pid__gt=0)
            .exclude(phase__in=TERMINAL_PHASES)
            # A day run's pid is that of whichever process logged last: not the run's life.
            .exclude(SYNTHETIC_RUN_IDS)
        )
        return [pk for pk, pid in live.values_list("pk", "pid") if not pid_alive(pid)]

    # --- The run writer ---------------------------------------------------------
    # Every receiver creates, locks and updates runs through these methods, in
    # set-based SQL: a batch touches its runs in a few statements, whatever its size.
    # Runs are always locked and updated in id order (and created in run_id order),
    # so two batches touching the same runs cannot deadlock each other.

    def create_missing(self, project: Project, seeds: dict[str, dict]) -> dict[str, int]:
        """Create the runs of `seeds` (run_id -> column values) that do not exist yet.

        Returns run_id -> id of the runs this call created. One INSERT … SELECT FROM
        unnest: `bulk_create(ignore_conflicts=True)` prepares every default of every
        run in Python (~300 µs a run), and a trace opens a run of its own, so a batch
        of spans often creates dozens. Seeds give the SEED_COLUMNS they know; the rest
        take the model's defaults.
        """
        if not seeds:
            return {}
        sql, constant = _create_runs_sql()
        template = Run(project=project)
        params = [f.get_db_prep_save(getattr(template, f.attname), connection) for f in constant]
        run_ids = sorted(seeds)
        for name, kind in SEED_COLUMNS.items():
            if name == "run_id":
                params.append(run_ids)
                continue
            default = getattr(template, name)
            values = [seeds[run_id].get(name, default) for run_id in run_ids]
            if kind == "jsonb":
                values = [orjson.dumps(v or {}).decode() for v in values]
            params.append(values)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return dict(cursor.fetchall())

    def ids_by_run_id(self, project: Project, run_ids) -> dict[str, int]:
        """run_id -> id of the project's runs among `run_ids`, in one query."""
        if not run_ids:
            return {}
        runs = self.filter(project=project, run_id__in=list(run_ids))
        return dict(runs.values_list("run_id", "id"))

    def locked(self, project: Project, run_ids) -> dict[str, Run]:
        """The project's runs among `run_ids`, locked for the transaction."""
        runs = self.select_for_update().filter(project=project, run_id__in=list(run_ids))
        return {run.run_id: run for run in runs.order_by("id")}

    def lock_ids(self, ids) -> None:
        """Lock runs by id, for updates made in SQL rather than on instances."""
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {Run._meta.db_table} WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                [sorted(ids)],
            )

    def running_run_id(self, project: Project, slug: str) -> str | None:
        """The newest running run of a slug: where a record naming no run belongs."""
        runs = self.filter(project=project, slug=slug, status=Run.Status.RUNNING)
        return runs.order_by("-id").values_list("run_id", flat=True).first()

    def save_batch(self, runs: list[Run]) -> None:
        """Write what a batch changed on its (locked) runs: one UPDATE … FROM
        jsonb_to_recordset.

        The same as `bulk_update(runs, BATCH_FIELDS)`, which builds a CASE WHEN per
        run and field in Python (~4 ms a run). The rows travel as one JSON document;
        PostgreSQL reads each value with its column's type (a Decimal as its exact
        text, times in ISO 8601).
        """
        if not runs:
            return
        attnames = ["id", *(Run._meta.get_field(name).attname for name in BATCH_FIELDS)]
        rows = [{name: getattr(run, name) for name in attnames} for run in runs]
        rows.sort(key=lambda row: row["id"])
        with connection.cursor() as cursor:
            cursor.execute(_save_batch_sql(), [orjson.dumps(rows, default=str).decode()])

    def add_usage(self, usage: dict[int, RunUsage]) -> None:
        """Add tokens and cost to runs (metrics); duration and exit code fill a gap
        only, since the run's own events decide them first."""
        if not usage:
            return
        ids = sorted(usage)
        rows = [usage[i] for i in ids]
        with connection.cursor() as cursor:
            cursor.execute(
                _ADD_USAGE_SQL,
                [
                    ids,
                    [u.tokens_in for u in rows],
                    [u.tokens_out for u in rows],
                    [u.cost_usd for u in rows],
                    [u.duration_ms for u in rows],
                    [u.exit_code for u in rows],
                ],
            )

    def merge_attributes(self, attributes: dict[int, dict]) -> None:
        """Put the newest attributes (work context, service, role) on each run."""
        attributes = {pk: attrs for pk, attrs in attributes.items() if attrs}
        if not attributes:
            return
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE runs_run AS r SET attributes = r.attributes || v.attrs"
                " FROM unnest(%s::bigint[], %s::jsonb[]) AS v(id, attrs) WHERE r.id = v.id",
                [
                    sorted(attributes),
                    [orjson.dumps(attributes[k]).decode() for k in sorted(attributes)],
                ],
            )

    def touch_from_spans(self, runs: dict[int, dict]) -> None:
        """Spans are signs of life of runs that existed before their batch: times
        widen, an orphaned run revives, a trace's root span finishes the run of that
        trace (`finish`: succeeded/failed at `end`), the newest context is merged.

        `runs`: id -> {started_at, last_event_at, attributes, finish?, end?}. Locks them.
        """
        if not runs:
            return
        self.lock_ids(runs)
        ids, firsts, lasts, statuses, ends, attrs = [], [], [], [], [], []
        for pk in sorted(runs):
            run = runs[pk]
            ids.append(pk)
            firsts.append(run["started_at"])
            lasts.append(run["last_event_at"])
            statuses.append(run.get("finish", ""))
            ends.append(run.get("end"))
            attrs.append(orjson.dumps(run["attributes"]).decode())
        with connection.cursor() as cursor:
            cursor.execute(_TOUCH_FROM_SPANS_SQL, [ids, firsts, lasts, statuses, ends, attrs])

    def mark_orphans(self, now: datetime | None = None) -> int:
        # Conditional UPDATEs: two beat ticks or two workers never flip a run twice.
        silent = self.orphan_candidates(now).update(status=Run.Status.ORPHANED)
        dead = self.filter(pk__in=self.dead_on_this_host(), status=Run.Status.RUNNING)
        return silent + dead.update(status=Run.Status.ORPHANED)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a pid we cannot judge: assume alive
    return True


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
    # The run promised signs of life (a heartbeat, a pid, `run.begin`): its silence
    # means it died. Runs known only from OTLP records and spans are never orphaned.
    watched = models.BooleanField(default=False, db_default=False)
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
            # Pages and the read API look a run up by run_id alone (any project).
            models.Index(fields=["run_id"], name="run_run_id"),
            models.Index(
                fields=["status"],
                name="run_active",
                condition=Q(status__in=["running", "orphaned"]),
            ),
            # Work-context filters: `attributes @> {"work_rig": "…"}` (runs/work_context.py).
            GinIndex(
                fields=["attributes"], name="run_attributes_gin", opclasses=["jsonb_path_ops"]
            ),
        ]

    def __str__(self) -> str:
        return f"{self.slug or '-'} {self.run_id}"

    def get_absolute_url(self) -> str:
        return reverse("runs:detail", args=[self.run_id])

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.RUNNING

    @property
    def last_seen_at(self) -> datetime | None:
        """The newest sign of life: a heartbeat or an event (what `doctor --runs` shows)."""
        seen = [t for t in (self.last_heartbeat, self.last_event_at) if t]
        return max(seen) if seen else None

    def elapsed_ms(self, now: datetime | None = None) -> int | None:
        """The final duration, or how long a still running run has been going."""
        if self.duration_ms is not None:
            return self.duration_ms
        if self.started_at is None or self.finished_at is not None:
            return None
        return max(0, int(((now or timezone.now()) - self.started_at).total_seconds() * 1000))

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def phases(self) -> list[PhaseSpan]:
        """Phases in order with durations, from `phase.start` events.

        A phase lasts until the next one starts; the last until the run finished
        (or its newest event while it runs). A phase entered twice appears twice.
        """
        starts = Event.objects.filter(run_id=self.pk, event="phase.start").order_by("seq")
        spans: list[PhaseSpan] = []
        for ts, phase, data in starts.values_list("ts", "phase", "data"):
            name = data.get("phase") if isinstance(data.get("phase"), str) else phase
            spans.append(PhaseSpan(name or "?", ts))
        end = self.finished_at or self.last_event_at
        for i, span in enumerate(spans):
            until = spans[i + 1].started_at if i + 1 < len(spans) else end
            if until is not None and until >= span.started_at:
                span.duration_ms = int((until - span.started_at).total_seconds() * 1000)
        return spans

    # --- Lifecycle ----------------------------------------------------------------
    # What the run's own records say about it (SPEC §3, docs/decisions.md). Applied
    # in memory by the worker (RunBatch) and saved once per batch.

    def begin(self, at: datetime, data: dict) -> str:
        """`run.begin`: the run (re)starts. Returns the run_id it was forked from, or ""."""
        self.status, self.exit_clean, self.finished_at, self.duration_ms = (
            Run.Status.RUNNING,
            False,
            None,
            None,
        )
        self.watched = True  # a run that says it began will say it ended
        self.started_at = min(self.started_at, at) if self.started_at else at
        kind = data.get("command") or data.get("kind")
        if isinstance(kind, str):
            self.kind = kind[:64]
        if isinstance(data.get("tags"), list):
            self.tags = [str(t)[:100] for t in data["tags"][:50]]
        attrs = data.get("attributes") if isinstance(data.get("attributes"), dict) else {}
        for key in WORK_KEYS:
            if key in data:
                attrs[key] = data[key]
        if attrs:
            self.attributes = {**self.attributes, **attrs}
        parent = data.get("parent_run_id")
        return parent if isinstance(parent, str) and 0 < len(parent) <= 128 else ""

    def finish_in_phase(self, at: datetime, exit_code: int | None = None) -> None:
        """The run reached a terminal phase (DONE, FAILED) while running: it finished."""
        status = Run.Status.SUCCEEDED if self.phase == "DONE" else Run.Status.FAILED
        self.finish(status, at, exit_code)

    def exit_cleanly(self, at: datetime, exit_code: int | None) -> None:
        """`run.exit_clean`: the process ended on its own terms (a non-zero code or the
        FAILED phase make it a failure, still a clean exit)."""
        self.exit_clean = True
        if self.status == Run.Status.RUNNING:
            failed = (exit_code or 0) != 0 or self.phase == "FAILED"
            self.finish(Run.Status.FAILED if failed else Run.Status.SUCCEEDED, at, exit_code)

    def crash(self, at: datetime, exit_code: int | None) -> None:
        """`run.crashed`: the agent saw itself die."""
        self.exit_clean = False
        self.finish(Run.Status.CRASHED, at, exit_code)

    def end_session(self, at: datetime, failed: bool) -> None:
        """An OTLP session-end record (`session.stop`, Gas Town; `session.ended`): the
        session behind the run is over, cleanly (docs/otlp.md)."""
        self.exit_clean = True
        if self.status in (Run.Status.RUNNING, Run.Status.ORPHANED):
            self.finish(Run.Status.FAILED if failed else Run.Status.SUCCEEDED, at)

    def heartbeat(self, phase: str = "", pid: int | None = None, host: str = "") -> None:
        """A sign of life: refreshes the heartbeat and revives an orphaned run."""
        now = timezone.now()
        fields: dict = {"last_heartbeat": now, "watched": True}
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
        """The run ended with `status` at `at`. In memory; saved with the batch."""
        self.status = status
        self.finished_at = at
        if exit_code is not None:
            self.exit_code = exit_code
        if self.started_at:
            self.duration_ms = max(0, int((at - self.started_at).total_seconds() * 1000))


# --- Writing runs: the SQL of the run writer and a batch's accounting -------------

WORK_KEYS = ("work_rig", "work_bead", "work_mol")
# Session-end records of OTLP senders (Gas Town's `session.stop`; `session:ended` and
# friends of other agents): they end the run of the session.
SESSION_END_EVENTS = frozenset({"session.stop", "session.end", "session.ended", "session:ended"})

# What a new run may take from the items that open it (create_missing); every other
# column its default.
SEED_COLUMNS = {
    "run_id": "text",
    "slug": "text",
    "started_at": "timestamptz",
    "last_event_at": "timestamptz",
    "status": "text",
    "finished_at": "timestamptz",
    "exit_clean": "boolean",
    "duration_ms": "bigint",
    "attributes": "jsonb",
}


@cache
def _create_runs_sql() -> tuple[str, list]:
    fields = [f for f in Run._meta.concrete_fields if not f.primary_key]
    qn = connection.ops.quote_name
    selects = [
        f"v.{f.name}" if f.name in SEED_COLUMNS else f"%s::{f.cast_db_type(connection)}"
        for f in fields
    ]
    arrays = ", ".join(f"%s::{kind}[]" for kind in SEED_COLUMNS.values())
    sql = (
        f"INSERT INTO {qn(Run._meta.db_table)} ({', '.join(qn(f.column) for f in fields)})"
        f" SELECT {', '.join(selects)} FROM unnest({arrays}) AS v({', '.join(SEED_COLUMNS)})"
        " ORDER BY v.run_id ON CONFLICT (project_id, run_id) DO NOTHING RETURNING run_id, id"
    )
    return sql, [f for f in fields if f.name not in SEED_COLUMNS]


# What an events batch may change on a run (RunQuerySet.save_batch).
BATCH_FIELDS = [
    "slug",
    "parent",
    "kind",
    "status",
    "phase",
    "pid",
    "host",
    "started_at",
    "finished_at",
    "last_event_at",
    "exit_clean",
    "exit_code",
    "watched",
    "tags",
    "attributes",
    "events_count",
    "errors_count",
    "warnings_count",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "duration_ms",
    "last_seq",
]


@cache
def _save_batch_sql() -> str:
    fields = [Run._meta.get_field(name) for name in BATCH_FIELDS]
    qn = connection.ops.quote_name
    assignments = ", ".join(f"{qn(f.column)} = v.{qn(f.column)}" for f in fields)
    columns = ", ".join(f"{qn(f.column)} {f.db_type(connection)}" for f in fields)
    return (
        f"UPDATE {qn(Run._meta.db_table)} AS r SET {assignments}"
        f" FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, {columns}) WHERE r.id = v.id"
    )


_ADD_USAGE_SQL = """
UPDATE runs_run AS r SET
    tokens_in = r.tokens_in + v.tokens_in,
    tokens_out = r.tokens_out + v.tokens_out,
    cost_usd = r.cost_usd + v.cost_usd,
    duration_ms = COALESCE(r.duration_ms, v.duration_ms),
    exit_code = COALESCE(r.exit_code, v.exit_code)
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::numeric[], %s::bigint[], %s::int[])
    AS v(id, tokens_in, tokens_out, cost_usd, duration_ms, exit_code)
WHERE r.id = v.id
"""

_FINISHING = "v.status <> '' AND r.status IN ('running', 'orphaned')"
_TOUCH_FROM_SPANS_SQL = f"""
UPDATE runs_run AS r SET
    started_at = LEAST(r.started_at, v.first_at),
    last_event_at = GREATEST(r.last_event_at, v.last_at),
    status = CASE WHEN {_FINISHING} THEN v.status
                  WHEN r.status = 'orphaned' THEN 'running' ELSE r.status END,
    finished_at = CASE WHEN {_FINISHING} THEN v.end_at ELSE r.finished_at END,
    exit_clean = CASE WHEN {_FINISHING} THEN true ELSE r.exit_clean END,
    duration_ms = CASE WHEN {_FINISHING} THEN GREATEST(0, (1000 * extract(epoch
        FROM v.end_at - LEAST(r.started_at, v.first_at)))::bigint)
        ELSE r.duration_ms END,
    attributes = r.attributes || v.attrs
FROM unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[], %s::text[],
            %s::timestamptz[], %s::jsonb[])
    AS v(id, first_at, last_at, status, end_at, attrs)
WHERE r.id = v.id
"""


@dataclass(slots=True)
class RunUsage:
    """What a batch of metrics adds to one run (RunQuerySet.add_usage)."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: Decimal = Decimal(0)
    duration_ms: int | None = None
    exit_code: int | None = None


@dataclass
class PhaseSpan:
    name: str
    started_at: datetime
    duration_ms: int | None = None


class EventQuerySet(models.QuerySet):
    def timeline(self, run: Run, prefix: str = "", level: str = "") -> EventQuerySet:
        """One run's events in order, narrowed by a name prefix and a minimum level."""
        events = self.filter(run_id=run.pk)
        if prefix:
            events = events.filter(event__startswith=prefix)
        if level in LEVELS[1:]:
            events = events.filter(level__in=LEVELS[LEVELS.index(level) :])
        return events.order_by("seq")

    def namespaces(self, run: Run, limit: int = 30) -> list[tuple[str, int]]:
        """The run's own event namespaces (`llm.`, `phase.`…) with counts, most used first.

        A dotless name is its own namespace. One GROUP BY over the run's rows.
        """
        first_part = Func(
            F("event"), Value("."), Value(1), function="split_part", output_field=models.TextField()
        )
        prefix = Case(
            When(event__contains=".", then=Concat(first_part, Value("."))),
            default=F("event"),
            output_field=models.TextField(),
        )
        rows = (
            self.filter(run_id=run.pk)
            .annotate(prefix=prefix)
            .values("prefix")
            .annotate(n=Count("id"))
            .order_by("-n", "prefix")[:limit]
        )
        return [(row["prefix"], row["n"]) for row in rows]


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
    # The portal's price of an `llm.call` that carried no cost (ModelPrice): kept
    # beside the agent's data, so exports give back exactly what the agent wrote.
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)

    objects = EventQuerySet.as_manager()

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


# --- Artifacts ----------------------------------------------------------------

# Shown inline when the content type or the name says text (and it decodes as UTF-8).
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/jsonl",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
    }
)
TEXT_SUFFIXES = frozenset(
    (  # noqa: SIM905 (a word list reads better as one string)
        ".txt .md .markdown .log .json .jsonl .ndjson .yaml .yml .toml .ini .cfg .csv .tsv"
        " .patch .diff .py .js .ts .sh .sql .html .xml .rst .out .err"
    ).split()
)
DIFF_SUFFIXES = (".patch", ".diff")
DIFF_TYPES = frozenset({"text/x-diff", "text/x-patch", "text/diff"})
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def clean_artifact_name(name: str) -> str:
    """An artifact name is one path segment: no slashes, control characters or dot names."""
    if not 0 < len(name) <= 255 or _BAD_NAME.search(name) or name in (".", ".."):
        raise ValueError(
            "name: 1 to 255 characters, no slashes or control characters, not '.' or '..'"
        )
    return name


def artifact_content_type(header: str, name: str) -> str:
    """The media type a client sent (parameters dropped), else a guess from the name."""
    media_type = header.split(";", 1)[0].strip().lower()
    if _MEDIA_TYPE.match(media_type) and media_type != "application/octet-stream":
        return media_type
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


class ArtifactQuerySet(models.QuerySet):
    def listing(self) -> ArtifactQuerySet:
        """Everything but the bytes: lists never load the files themselves."""
        return self.defer("content").order_by("name")


class Artifact(models.Model):
    """A named file of a run (`diff.patch`, `prompt.txt`…), kept in PostgreSQL as bytes."""

    run = models.ForeignKey(Run, models.CASCADE, related_name="artifacts")
    name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=255, default="application/octet-stream")
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    content = models.BinaryField()
    created = models.DateTimeField(default=timezone.now)

    objects = ArtifactQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "name"], name="artifact_unique_per_run")
        ]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def store(cls, run: Run, name: str, content: bytes, content_type: str) -> Artifact:
        """Create or replace the run's artifact of that name (a PUT is idempotent)."""
        artifact, _ = cls.objects.update_or_create(
            run=run,
            name=name,
            defaults={
                "content": content,
                "content_type": content_type,
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
                "created": timezone.now(),
            },
        )
        return artifact

    @property
    def is_diff(self) -> bool:
        return self.name.lower().endswith(DIFF_SUFFIXES) or self.content_type in DIFF_TYPES

    @property
    def is_text(self) -> bool:
        ctype = self.content_type
        return (
            ctype.startswith("text/")
            or ctype in TEXT_TYPES
            or ctype.endswith(("+json", "+xml"))
            or os.path.splitext(self.name.lower())[1] in TEXT_SUFFIXES
        )

    def text(self) -> str | None:
        """The content as text, or None when it is binary after all (not UTF-8, or NUL bytes)."""
        data = bytes(self.content)
        if b"\x00" in data[:8192]:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def diff(self) -> Diff | None:
        text = self.text()
        return parse_unified_diff(text) if text is not None else None


# --- Unified diffs, as git and diff -u write them -------------------------------


class EventCount(models.Model):
    """Events and error-level events per project and minute of their time.

    What /health and the dashboard count ("events in the last 24 hours") without
    reading the events themselves: a day is at most 1,440 rows per project however
    many millions of events it holds. Kept by the worker, one upsert per batch.
    """

    project = models.ForeignKey(Project, models.CASCADE, related_name="+")
    minute = models.DateTimeField()
    events = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "minute"], name="eventcount_minute")
        ]
        indexes = [models.Index(fields=["minute"], name="eventcount_by_minute")]

    def __str__(self) -> str:
        return f"{self.events} events at {self.minute:%Y-%m-%d %H:%M}"


class RunMetric(models.Model):
    """One number an agent reported: GitTinkerer's `run_metrics`, Code Buddy's tool and
    provider metrics, OTLP sums and gauges. High volume, append-only, like Event.

    `run` is nullable (a metric about the fleet, or one whose run was pruned) and has
    no database-level constraint, for the same bulk-load reason as Event.
    """

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, models.CASCADE, related_name="metrics")
    run = models.ForeignKey(
        Run,
        models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        null=True,
        blank=True,
        related_name="metrics",
    )
    name = models.CharField(max_length=200)
    value = models.FloatField()
    unit = models.CharField(max_length=32, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now)
    # Where it came from: "api" (POST /api/metrics/record), "otlp", "event".
    source = models.CharField(max_length=8, default="api")
    # OTLP histogram points: {"bounds": [...], "counts": [...], "sum", "count", "min",
    # "max"} as sent (label `otel.temporality`: delta or cumulative, see docs/otlp.md);
    # `value` then holds the point's sum.
    histogram = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [
            # Aggregations filter by project and name over a time window.
            models.Index(fields=["project", "name", "recorded_at"], name="metric_project_name"),
            # The run page's metrics panel.
            models.Index(fields=["run", "name"], name="metric_run_name"),
            BrinIndex(fields=["recorded_at"], name="metric_recorded_brin"),
            # Whether a selection holds OTLP points at all (runs/analytics.py): most
            # metrics have none, and their aggregates skip the OTLP rules.
            models.Index(fields=["name"], name="metric_otlp_name", condition=Q(source="otlp")),
        ]

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class ModelPriceQuerySet(models.QuerySet):
    def book(self) -> PriceBook:
        """Every price, loaded once: a batch prices all its calls from memory."""
        return PriceBook(list(self.order_by("-valid_from", "-id")))


class ModelPrice(models.Model):
    """What one model's tokens cost from a date on; edited by operators in the admin.

    `model` is an exact name or a glob pattern (`claude-sonnet-4*`); the exact name
    wins over a pattern, and among patterns the longest (most specific) one.
    """

    model = models.CharField(max_length=200, help_text="Exact model name or glob (gpt-4o*).")
    input_per_mtok = models.DecimalField("input USD per 1M tokens", max_digits=12, decimal_places=6)
    output_per_mtok = models.DecimalField(
        "output USD per 1M tokens", max_digits=12, decimal_places=6
    )
    valid_from = models.DateTimeField(default=timezone.now)
    note = models.CharField(max_length=200, blank=True)

    objects = ModelPriceQuerySet.as_manager()

    class Meta:
        ordering = ["model", "-valid_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "valid_from"], name="price_model_from")
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.valid_from:%Y-%m-%d}"

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        total = self.input_per_mtok * tokens_in + self.output_per_mtok * tokens_out
        return (total / 1_000_000).quantize(Decimal("0.000001"))


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class PriceBook:
    """The price table in memory, for pricing many calls without a query each."""

    def __init__(self, prices: list[ModelPrice]):
        self.prices = prices
        self._candidates: dict[str, list[ModelPrice]] = {}

    def candidates(self, model: str) -> list[ModelPrice]:
        """The prices that can apply to `model`, best first: the exact name before any
        glob, longer globs before shorter ones, newer prices before older ones.
        Matched once per model name; a batch prices thousands of calls of a few models.
        """
        found = self._candidates.get(model)
        if found is None:
            found = [
                p
                for p in self.prices
                if p.model == model or (_is_glob(p.model) and fnmatch.fnmatchcase(model, p.model))
            ]
            found.sort(key=lambda p: (p.model != model, -len(p.model), -p.valid_from.timestamp()))
            self._candidates[model] = found
        return found

    def price(self, model: str, at: datetime) -> ModelPrice | None:
        """The price of `model` valid at `at`: exact name first, then the longest glob."""
        if not model:
            return None
        for price in self.candidates(model):
            if price.valid_from <= at:
                return price
        return None

    def cost(self, model: str, tokens_in: int, tokens_out: int, at: datetime) -> Decimal | None:
        price = self.price(model, at)
        return price.cost(tokens_in, tokens_out) if price is not None else None
