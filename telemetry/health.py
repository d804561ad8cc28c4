"""Is Runlens well? `/health` for probes and people, `/health/live` for the process alone,
the `/status` page, and the worker heartbeats and job records it reads (docs/operations.md).

The counters are meant to be polled every few seconds on an installation with tens of
millions of events, so each one is answered from an index: the partial index on live
runs, the per-minute event counts the worker keeps, the partial index on pending
batches. A statement timeout bounds them all: a slow counter comes back empty, never a hung probe.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta
from functools import cache

from celery import signals
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import DatabaseError, Error, connection, transaction
from django.db.models import Count, Max, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache

from portal.http import allow_methods
from portal.pages import page

logger = logging.getLogger(__name__)

STARTED = time.monotonic()
COUNTER_TIMEOUT_MS = 2000  # per /health request, for all counters together
BROKER_TIMEOUT_S = 1.0
HEARTBEAT_EVERY_S = 30  # each worker notes itself alive this often (WorkerHeartbeatThread)
WORKER_RECENT_S = 120  # a worker that noted itself within this is "seen"
WORKER_FORGET_S = 7 * 86400  # heartbeats older than this are removed when read


# --- Version and commit -----------------------------------------------------------


@cache
def commit() -> str:
    """RUNLENS_COMMIT from the build, else the checkout's HEAD (asked once), else "unknown"."""
    if settings.RUNLENS_COMMIT:
        return settings.RUNLENS_COMMIT[:64]
    if (settings.BASE_DIR / ".git").exists() and shutil.which("git"):
        try:
            found = subprocess.run(
                ["git", "-C", str(settings.BASE_DIR), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=2,
                check=True,
            ).stdout.strip()
            if re.fullmatch(r"[0-9a-f]{4,40}", found):
                return found
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def uptime_seconds() -> int:
    return int(time.monotonic() - STARTED)


# --- Broker -------------------------------------------------------------------------

# One thread checks the broker; a check still running (a broker that hangs) is waited
# on again rather than joined by a second one, so probes never pile up threads.
_broker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-check")
_broker_lock = threading.Lock()
_broker_future: Future | None = None


def _check_broker(url: str, options: dict) -> bool:
    if url.startswith("filesystem:"):
        # Kombu's filesystem transport: the broker is the folders; they must exist and
        # be writable by this process.
        folders = {options.get(k) for k in ("data_folder_in", "data_folder_out")} - {None}
        if options.get("control_folder"):
            folders.add(options["control_folder"])
        return bool(folders) and all(
            os.path.isdir(f) and os.access(f, os.W_OK | os.X_OK) for f in folders
        )
    if url.startswith("memory:"):
        return True
    from kombu import Connection

    transport_options = {
        **options,
        "max_retries": 0,
        "socket_timeout": BROKER_TIMEOUT_S,
        "socket_connect_timeout": BROKER_TIMEOUT_S,
    }
    with Connection(
        url, connect_timeout=BROKER_TIMEOUT_S, transport_options=transport_options
    ) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=1)
        return conn.connected


def broker_ok() -> bool:
    """A real check of the configured Celery broker, answered within about a second."""
    global _broker_future
    url = settings.CELERY_BROKER_URL
    options = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS or {})
    with _broker_lock:
        if _broker_future is None or _broker_future.done():
            _broker_future = _broker_pool.submit(_check_broker, url, options)
        future = _broker_future
    try:
        return bool(future.result(timeout=BROKER_TIMEOUT_S + 0.5))
    except FutureTimeout:
        return False
    except Exception as exc:  # unreachable, refused, unknown transport: all mean "not ok"
        logger.info("broker check failed: %s", exc, extra={"broker_error": str(exc)[:200]})
        return False


# --- Counters -----------------------------------------------------------------------

# One round trip. Every part is answered by an index: run_active (partial, live runs),
# eventcount_by_minute (the per-minute event counts the worker keeps: at most 1,440
# rows a project for a day, however many events it holds), errorreport_received_brin,
# batch_pending; the worker heartbeats are a row per worker.
_COUNTERS_SQL = """
SELECT
  (SELECT count(*) FROM runs_run),
  (SELECT count(*) FROM runs_run WHERE status = 'running'),
  (SELECT coalesce(sum(events), 0)::bigint FROM runs_eventcount
     WHERE minute >= date_trunc('minute', %(day_ago)s::timestamptz) AND minute <= %(now)s),
  (SELECT coalesce(sum(errors), 0)::bigint FROM runs_eventcount
     WHERE minute >= date_trunc('minute', %(day_ago)s::timestamptz) AND minute <= %(now)s),
  (SELECT count(*) FROM telemetry_errorreport
     WHERE received_at >= %(day_ago)s AND source <> 'event'),
  (SELECT count(*) FROM telemetry_ingestbatch WHERE state = 'pending'),
  (SELECT min(received_at) FROM telemetry_ingestbatch WHERE state = 'pending'),
  (SELECT count(*) FROM telemetry_workerheartbeat WHERE seen_at >= %(worker_recent)s),
  (SELECT coalesce(sum(octet_length(body)), 0)::bigint FROM telemetry_ingestbatch
     WHERE state = 'pending')
"""

EMPTY_METRICS = {
    "runs_total": None,
    "runs_active": None,
    "runs_orphaned": None,
    "events_last_24h": None,
    "errors_last_24h": None,
    "ingest_backlog": None,
    "oldest_pending_batch_s": None,
    "workers_seen": None,
    "ingest_backlog_bytes": None,
    "ingest_backlog_max_bytes": None,
}


def counters(now: datetime | None = None) -> dict:
    """The /health counters. Raises DatabaseError when PostgreSQL cannot answer.

    errors_last_24h: error-level events plus error reports from other sources (beacons,
    Sentry); error-level events become reports too, so they are counted once, as events.
    """
    from runs.models import Run

    now = now or timezone.now()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL statement_timeout = {COUNTER_TIMEOUT_MS}")
            cursor.execute(
                _COUNTERS_SQL,
                {
                    "day_ago": now - timedelta(hours=24),
                    "now": now,
                    "worker_recent": now - timedelta(seconds=WORKER_RECENT_S),
                },
            )
            row = cursor.fetchone()
            total, active, events, error_events, reports, backlog, oldest, seen = row[:8]
            backlog_bytes = row[8]
        orphaned = Run.objects.orphans(now).count()
    return {
        "runs_total": total,
        "runs_active": active,
        "runs_orphaned": orphaned,
        "events_last_24h": events,
        "errors_last_24h": error_events + reports,
        "ingest_backlog": backlog,
        "oldest_pending_batch_s": (
            max(0, int((now - oldest).total_seconds())) if oldest is not None else 0
        ),
        "workers_seen": seen,
        # Backpressure (docs/reliability.md): past the bound, write requests are refused.
        "ingest_backlog_bytes": backlog_bytes,
        "ingest_backlog_max_bytes": settings.BACKLOG_MAX_BYTES,
    }


def db_ping() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone() == (1,)


def report() -> tuple[dict, int]:
    """The /health body and its status code: 200 ok/degraded, 503 when the database is down."""
    body: dict = {
        "status": "ok",
        "version": settings.RUNLENS_VERSION,
        "commit": commit(),
        "uptime_seconds": uptime_seconds(),
        "db_ok": False,
        "broker_ok": broker_ok(),
        "metrics": dict(EMPTY_METRICS),
    }
    try:
        body["db_ok"] = db_ping()
    except Error as exc:  # OperationalError (refused, timed out), InterfaceError…
        logger.warning("health: database unreachable: %s", exc)
        # A broken connection must not linger into the next request of this thread.
        connection.close_if_unusable_or_obsolete()
        body["status"] = "down"
        return body, 503
    try:
        body["metrics"] = counters()
    except DatabaseError as exc:
        # Reachable but too slow (the statement timeout) or failing: say so, stay up.
        logger.warning("health: counters failed: %s", exc)
        body["status"] = "degraded"
    if not body["broker_ok"]:
        body["status"] = "degraded"
    return body, 200


@allow_methods("GET")
@never_cache
def health(request: HttpRequest) -> JsonResponse:
    """GET /health (SPEC §4). No login: load balancers and uptime checks call it."""
    body, status = report()
    return JsonResponse(body, status=status)


@allow_methods("GET")
@never_cache
def live(request: HttpRequest) -> JsonResponse:
    """GET /health/live: the process answers. No database, no broker."""
    return JsonResponse({"status": "ok", "uptime_seconds": uptime_seconds()})


# --- Worker heartbeats and the last retention run, in PostgreSQL -------------------
# Web, worker and beat may run on different hosts with nothing shared but PostgreSQL and
# the broker, so what the status page shows of the workers and of retention lives in
# the database (docs/deploy.md), never in files under RUNLENS_VAR_DIR.


def record_retention(deleted_runs: dict[str, int], reports: int = 0) -> None:
    """Called at the end of every retention run (beat's hourly task and `manage.py prune`)."""
    from telemetry.models import JobRun

    result = {
        "runs_deleted": sum(deleted_runs.values()),
        "reports_deleted": reports,
        "projects": len(deleted_runs),
    }
    try:
        JobRun.objects.update_or_create(
            job="retention", defaults={"finished_at": timezone.now(), "result": result}
        )
    except DatabaseError as exc:  # the prune itself succeeded; the page keeps the old run
        logger.warning("could not record the retention run: %s", exc)


def last_retention() -> dict | None:
    from telemetry.models import JobRun

    found = JobRun.objects.filter(job="retention").first()
    return {**found.result, "at": found.finished_at} if found else None


_last_beat: dict[str, float] = {}


def record_worker(
    hostname: str, throttle_s: float = 0, queues: str = "", started: bool = False
) -> None:
    """Note that the worker `hostname` is alive (at most once per `throttle_s` per process).

    Never raises: a worker must outlive its database as it outlives its broker."""
    from telemetry.models import WorkerHeartbeat

    hostname = (hostname or "worker")[:200]
    now = time.monotonic()
    if throttle_s and now - _last_beat.get(hostname, -throttle_s) < throttle_s:
        return
    _last_beat[hostname] = now
    at = timezone.now()
    row = WorkerHeartbeat(
        hostname=hostname, pid=os.getpid(), queues=queues[:200], started_at=at, seen_at=at
    )
    update = ["pid", "seen_at"] + (["queues", "started_at"] if started else [])
    try:
        WorkerHeartbeat.objects.bulk_create(
            [row], update_conflicts=True, unique_fields=["hostname"], update_fields=update
        )
    except Error as exc:
        logger.warning("could not record the worker heartbeat: %s", exc)


def forget_worker(hostname: str) -> None:
    """A worker stopping cleanly leaves the list at once rather than turning stale."""
    from telemetry.models import WorkerHeartbeat

    try:
        WorkerHeartbeat.objects.filter(hostname=hostname[:200]).delete()
    except Error as exc:
        logger.warning("could not remove the worker heartbeat: %s", exc)


def workers(now: datetime | None = None) -> list[dict]:
    """Workers that noted themselves, newest first, each marked recent or not."""
    from telemetry.models import WorkerHeartbeat

    now = now or timezone.now()
    WorkerHeartbeat.objects.filter(seen_at__lt=now - timedelta(seconds=WORKER_FORGET_S)).delete()
    return [
        {
            "hostname": w.hostname,
            "pid": w.pid,
            "queues": w.queues,
            "started_at": w.started_at,
            "at": w.seen_at,
            "recent": (now - w.seen_at).total_seconds() <= WORKER_RECENT_S,
        }
        for w in WorkerHeartbeat.objects.order_by("-seen_at")[:200]
    ]


class WorkerHeartbeatThread(threading.Thread):
    """Notes its worker alive every HEARTBEAT_EVERY_S from the worker's main process, on
    a database connection of its own, whatever the worker is busy with and whichever
    queues it consumes (beat's housekeeping tasks go to one queue only)."""

    def __init__(self, hostname: str, queues: str) -> None:
        super().__init__(name="runlens-worker-heartbeat", daemon=True)
        self.hostname, self.queues = hostname, queues
        self.stopping = threading.Event()

    def run(self) -> None:
        started = True
        while True:
            record_worker(self.hostname, queues=self.queues, started=started)
            started = False
            # One connection a beat, closed at once: idle workers hold no connection.
            connection.close()
            if self.stopping.wait(HEARTBEAT_EVERY_S):
                break
        forget_worker(self.hostname)
        connection.close()


_heartbeat: WorkerHeartbeatThread | None = None


@signals.worker_ready.connect
def _worker_started(sender=None, **kwargs) -> None:
    global _heartbeat
    hostname = getattr(sender, "hostname", "") or ""
    try:
        queues = ",".join(sorted(sender.app.amqp.queues.consume_from or {}))
    except AttributeError:
        queues = ""
    _heartbeat = WorkerHeartbeatThread(hostname, queues)
    _heartbeat.start()


@signals.worker_shutdown.connect
def _worker_stopping(**kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stopping.set()
        _heartbeat.join(5)


# --- The /status page ----------------------------------------------------------------


def last_processed_batch() -> datetime | None:
    """When a worker last finished a batch: the newest of the newest batches (by id)."""
    from telemetry.models import IngestBatch

    newest = IngestBatch.objects.order_by("-id").values("processed_at")[:200]
    return max((row["processed_at"] for row in newest if row["processed_at"]), default=None)


def skipped_envelope_items(limit: int = 50) -> list[dict]:
    """Sentry envelope items stored nowhere (sessions, client reports, replays…), per type
    over every project: one small GROUP BY (a row per project and type)."""
    from telemetry.models import EnvelopeItemCount

    return list(
        EnvelopeItemCount.objects.values("item_type")
        .annotate(
            total=Sum("count"), last=Max("last_seen"), projects=Count("project", distinct=True)
        )
        .order_by("-total", "item_type")[:limit]
    )


def backlog_context(limit: int = 20) -> dict:
    """The spool's backlog for the status page: in all and for the projects that have
    one, largest first, each against its bound and whether it is refused now."""
    from runs.models import Project
    from telemetry.ingest import backlog

    reading = backlog.read()
    largest = sorted(reading.projects.values(), key=lambda p: p.bytes, reverse=True)[:limit]
    names = dict(
        Project.objects.filter(pk__in=[p.project_id for p in largest]).values_list("pk", "name")
    )
    per_project = settings.BACKLOG_MAX_BYTES_PER_PROJECT
    return {
        "batches": reading.batches,
        "bytes": reading.bytes,
        "max_bytes": settings.BACKLOG_MAX_BYTES,
        "max_bytes_per_project": per_project,
        "percent": min(100, round(100 * reading.bytes / settings.BACKLOG_MAX_BYTES)),
        "full": reading.full,
        "projects": [
            {
                "name": names.get(p.project_id, f"project {p.project_id}"),
                "batches": p.batches,
                "bytes": p.bytes,
                "oldest_s": max(0, int((reading.read_at - p.oldest).total_seconds())),
                "percent": min(100, round(100 * p.bytes / per_project)),
                "refused": reading.refuses(p.project_id) is not None,
            }
            for p in largest
        ],
    }


def status_context() -> dict:
    body, code = report()
    context = {"health": body, "db_down": code == 503, "now": timezone.now()}
    if code == 503:
        return context
    context.update(
        backlog=backlog_context(),
        workers=workers(),
        last_batch=last_processed_batch(),
        retention=last_retention(),
        skipped_items=skipped_envelope_items(),
    )
    return context


@allow_methods("GET")
@login_required
@never_cache
def status_page(request: HttpRequest) -> HttpResponse:
    """The health page: counters, backlog, workers, retention; polls its own panel."""
    return page(
        request, "telemetry/status.html", status_context(), {"status-panel": "status-panel"}
    )
