"""Waking a worker for what requests spooled: one task a burst, not one a request.

A request commits its batch (that commit is the promise of its 2xx) and then asks
for a worker. A Celery message per request costs the web process ~0.5 ms and the
worker ~2.3 ms of CPU (docs/performance.md): more than storing a small Sentry event.
So each web process gathers the kinds committed during WAKE_DELAY_MS and sends one
`drain_spool(kind)` for them; that task stores everything of the kind pending when it
runs, several batches per transaction (pipeline.drain).

The order makes it safe: a kind is noted after its batch committed and the message
leaves after the note, so the drain it starts sees the batch. If the message is lost
(the broker is down, the process stops before sending) the batch stays pending, and
the sweeper sends it again after SWEEP_PENDING_AFTER_SECONDS.

With Celery eager (the tests' default) the batch is stored at once, in the request.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from django.conf import settings

from portal.celery import app as celery_app
from portal.logging import request_id_var

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_noted: dict[str, str] = {}  # kind -> the id of the first request that noted it
_wake = threading.Event()
_owner_pid = 0


def batch_committed(batch_id: int, kind: str) -> None:
    """Called once a spooled batch is committed."""
    # The task module imports the models, which call this: looked up at call time.
    from telemetry.tasks import process_batch

    if celery_app.conf.task_always_eager:
        process_batch.delay(batch_id)
        return
    with _lock:
        _noted.setdefault(kind, request_id_var.get())
        _start_waker()
    _wake.set()


def _start_waker() -> None:
    global _owner_pid
    if _owner_pid == os.getpid():
        return
    # A thread does not survive a fork: each process starts its own, once.
    _owner_pid = os.getpid()
    threading.Thread(target=_waker, name="runlens-wakeup", daemon=True).start()


def _waker() -> None:
    while True:
        _wake.wait()
        time.sleep(settings.WAKE_DELAY_MS / 1000)
        # Cleared before the kinds are taken: a note made after this sets it again.
        _wake.clear()
        with _lock:
            noted = dict(_noted)
            _noted.clear()
        for kind, request_id in noted.items():
            _send(kind, request_id)


def _send(kind: str, request_id: str) -> None:
    from telemetry.tasks import drain_spool

    token = request_id_var.set(request_id)  # the message names the request that woke it
    try:
        drain_spool.delay(kind)
    except Exception:
        logger.exception("could not wake a worker for %s batches; the sweeper will", kind)
    finally:
        request_id_var.reset(token)
