"""The Celery app. Beat's schedule lives here, in code (SPEC §7).

Request ids travel with tasks: a task sent while a request is handled carries
the request's id in a message header, and the worker puts it in the logging
contextvar while the task runs, so the worker's log lines and the error
reports the task stores name the request that caused them.
"""

import os

from celery import Celery, signals
from kombu import Queue

from portal.broker import survive_broker_loss
from portal.logging import request_id_var

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("runlens")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# A worker outlives its broker: it retries the connection forever, at start and after a
# loss, and keeps what it had taken (acks late) for another worker or its own return.
app.conf.broker_connection_retry = True
app.conf.broker_connection_retry_on_startup = True
app.conf.broker_connection_max_retries = None  # Celery's default gives up after 100 tries
app.conf.broker_channel_error_retry = True
# No remote control: nothing of Runlens inspects workers through the broker (the status
# page reads their heartbeats from PostgreSQL), and its reply queues are more channels
# to tear down and rebuild on every reconnect.
app.conf.worker_enable_remote_control = False


survive_broker_loss()

# Three queues, so that a long prune or export never waits in line before ingest, and
# ingest never waits behind them: `serve --role worker --queues ingest` on one host,
# `--queues housekeeping,notifications` on another (docs/deploy.md).
INGEST, HOUSEKEEPING, NOTIFICATIONS = "ingest", "housekeeping", "notifications"
QUEUES = (INGEST, HOUSEKEEPING, NOTIFICATIONS)


def route(name: str, args, kwargs, options, task=None, **kw) -> dict:
    """The queue of a task, by its name. Alert delivery is matched by words in its name
    (`…alert…`, `…deliver…`), so new notification tasks need no entry here."""
    lowered = name.lower()
    if name in ("telemetry.tasks.process_batch", "telemetry.tasks.drain_spool"):
        return {"queue": INGEST}
    if "alert" in lowered or "deliver" in lowered or "notif" in lowered:
        return {"queue": NOTIFICATIONS}
    # Retention, orphans, sweeps, rate counters, exports, and anything new.
    return {"queue": HOUSEKEEPING}


app.conf.task_queues = [Queue(name, routing_key=name) for name in QUEUES]
app.conf.task_default_queue = HOUSEKEEPING
app.conf.task_routes = (route,)

app.conf.beat_schedule = {
    "sweep-pending-batches": {
        "task": "telemetry.tasks.sweep_pending",
        "schedule": 30.0,
    },
    "detect-orphans": {"task": "runs.tasks.detect_orphans", "schedule": 30.0},
    "evaluate-alerts": {"task": "telemetry.tasks.evaluate_alerts", "schedule": 30.0},
    "retention": {"task": "telemetry.tasks.prune", "schedule": 3600.0},
    "event-partitions": {"task": "runs.tasks.ensure_partitions", "schedule": 3600.0},
    "purge-rate-counters": {"task": "telemetry.tasks.purge_rate_counters", "schedule": 300.0},
}
# telemetry/health.py holds the signals by which each worker notes itself alive.
app.autodiscover_tasks(["telemetry"], related_name="health")

REQUEST_ID_HEADER = "request_id"


@signals.setup_logging.connect
def use_django_logging(**kwargs) -> None:
    """Keep Django's JSON lines in the worker and beat instead of Celery's own format."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@signals.before_task_publish.connect
def add_request_id(headers: dict | None = None, **kwargs) -> None:
    request_id = request_id_var.get()
    if request_id and headers is not None:
        headers.setdefault(REQUEST_ID_HEADER, request_id)


# Tokens of the contextvar per running task, to restore it after the task:
# eager tasks run inside the request and must give its id back unchanged.
_tokens: dict[str, list] = {}


@signals.task_prerun.connect
def set_request_id(task_id: str = "", task=None, **kwargs) -> None:
    request = getattr(task, "request", None)
    request_id = getattr(request, REQUEST_ID_HEADER, None) or (
        (getattr(request, "headers", None) or {}).get(REQUEST_ID_HEADER)
    )
    if isinstance(request_id, str) and request_id:
        _tokens.setdefault(task_id, []).append(request_id_var.set(request_id[:128]))


@signals.task_postrun.connect
def reset_request_id(task_id: str = "", **kwargs) -> None:
    stack = _tokens.get(task_id)
    if stack:
        request_id_var.reset(stack.pop())
        if not stack:
            del _tokens[task_id]
