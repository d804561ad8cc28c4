from __future__ import annotations

import difflib
import fnmatch
import hashlib
import mimetypes
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.indexes import BrinIndex, GinIndex
from django.db import models
from django.db.models import Case, Count, F, Func, Q, Value, When
from django.db.models.functions import Concat, Greatest
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

TERMINAL_PHASES = frozenset({"DONE", "FAILED"})
LEVELS = ("debug", "info", "warn", "error")  # in order: a level filter is a minimum


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


# Runs the OTLP receiver opens for items that name no run (telemetry/otlp.py, docs/otlp.md):
# one per trace (`trace-<32 hex>`) or per service and UTC day (`<service>@YYYY-MM-DD`).
# No process stands behind them, so nothing ever exits them cleanly: silence is not death.
SYNTHETIC_RUN_IDS = Q(run_id__regex=r"^trace-[0-9a-f]{32}$") | Q(
    run_id__regex=r"^[^/]{1,100}@[0-9]{4}-[0-9]{2}-[0-9]{2}$"
)


class RunQuerySet(models.QuerySet):
    def orphan_candidates(self, now: datetime | None = None) -> RunQuerySet:
        """Running, not cleanly exited, non-terminal phase, silent for too long.

        Silence is measured on the newest of the heartbeat and the last event:
        a run that streams events is alive even when its client sends no heartbeat.
        Synthetic OTLP runs (SYNTHETIC_RUN_IDS) are never candidates.
        """
        now = now or timezone.now()
        cutoff = now - timedelta(seconds=settings.ORPHAN_AFTER_SECONDS)
        return (
            self.filter(status=Run.Status.RUNNING, exit_clean=False)
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

MAX_DIFF_LINES = 20_000
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")


@dataclass
class DiffLine:
    kind: str  # "context", "add", "del" or "note" (`\ No newline at end of file`)
    text: str
    old_no: int | None = None
    new_no: int | None = None


@dataclass
class DiffHunk:
    header: str
    section: str
    lines: list[DiffLine] = field(default_factory=list)


@dataclass
class DiffFile:
    old_path: str = ""
    new_path: str = ""
    hunks: list[DiffHunk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # mode changes, renames, binary
    added: int = 0
    removed: int = 0

    @property
    def path(self) -> str:
        return self.old_path if self.new_path in ("", "/dev/null") else self.new_path

    @property
    def status(self) -> str:
        # git says so in an extended header line when there are no ---/+++ lines (binary).
        if self.old_path == "/dev/null" or any(n.startswith("new file") for n in self.notes):
            return "added"
        if self.new_path == "/dev/null" or any(n.startswith("deleted file") for n in self.notes):
            return "deleted"
        if self.old_path and self.new_path and self.old_path != self.new_path:
            return "renamed"
        return "modified"


@dataclass
class Diff:
    files: list[DiffFile]
    preamble: str = ""  # what came before the first file (a format-patch mail header)
    truncated: bool = False

    @property
    def added(self) -> int:
        return sum(f.added for f in self.files)

    @property
    def removed(self) -> int:
        return sum(f.removed for f in self.files)


def _diff_path(raw: str) -> str:
    path = raw.split("\t", 1)[0].strip()
    if path.startswith('"') and path.endswith('"'):
        path = path[1:-1]
    return path[2:] if path.startswith(("a/", "b/")) else path


def parse_unified_diff(text: str) -> Diff:
    """Files, hunks and numbered lines of a unified diff.

    Hunk line counts decide where a hunk ends, so a removed line that itself
    starts with `-- ` is not taken for the next file's `--- ` header.
    """
    diff = Diff(files=[])
    preamble: list[str] = []
    current: DiffFile | None = None
    hunk: DiffHunk | None = None
    old_no = new_no = old_left = new_left = 0
    shown = 0
    for line in text.splitlines():
        if hunk is not None and (old_left > 0 or new_left > 0):
            tag = line[:1]
            if tag in ("+", "-", " ", ""):
                shown += 1
                if shown > MAX_DIFF_LINES:
                    diff.truncated = True
                    break
            if tag == "+":
                hunk.lines.append(DiffLine("add", line[1:], None, new_no))
                new_no, new_left = new_no + 1, new_left - 1
                current.added += 1
                continue
            if tag == "-":
                hunk.lines.append(DiffLine("del", line[1:], old_no, None))
                old_no, old_left = old_no + 1, old_left - 1
                current.removed += 1
                continue
            if tag in (" ", ""):  # some tools strip the space of an empty context line
                hunk.lines.append(DiffLine("context", line[1:], old_no, new_no))
                old_no, new_no = old_no + 1, new_no + 1
                old_left, new_left = old_left - 1, new_left - 1
                continue
        if line.startswith("\\") and hunk is not None:
            hunk.lines.append(DiffLine("note", line[1:].strip()))
            continue
        if line.startswith("diff --git "):
            current, hunk = DiffFile(), None
            diff.files.append(current)
            a, sep, b = line[len("diff --git ") :].rpartition(" b/")
            if sep:
                current.old_path, current.new_path = _diff_path(a), b
            continue
        if line.startswith("--- ") and (current is None or current.hunks or current.old_path):
            if current is None or current.hunks:
                current, hunk = DiffFile(), None  # plain `diff -u`: no `diff --git` line
                diff.files.append(current)
            current.old_path = _diff_path(line[4:])
            continue
        if line.startswith("+++ ") and current is not None and not current.hunks:
            current.new_path = _diff_path(line[4:])
            continue
        match = _HUNK.match(line)
        if match:
            if current is None:
                current = DiffFile()
                diff.files.append(current)
            old_no, new_no = int(match[1]), int(match[3])
            old_left = int(match[2]) if match[2] is not None else 1
            new_left = int(match[4]) if match[4] is not None else 1
            hunk = DiffHunk(line.split(" @@", 1)[0] + " @@", match[5])
            current.hunks.append(hunk)
            continue
        if current is None:
            preamble.append(line)
        elif not current.hunks and line.strip():
            current.notes.append(line)  # index, mode, rename and "Binary files" lines
    diff.preamble = "\n".join(preamble).strip("\n")
    return diff


def diff_texts(old: str, new: str, old_label: str, new_label: str) -> Diff:
    """Two texts (a same-named artifact of two runs) as a parsed unified diff."""
    lines = difflib.unified_diff(
        old.splitlines(), new.splitlines(), old_label, new_label, lineterm="", n=3
    )
    return parse_unified_diff("\n".join(lines))


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
