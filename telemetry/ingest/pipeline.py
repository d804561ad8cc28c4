"""The one way in: every spooled protocol's request and worker halves.

Request (`accept`): authenticate → refuse while the spool is past its bound
(telemetry/ingest/backlog.py) → read the body within the receiver's limit,
decompressing while streaming → judge → spool durably (IngestBatch) → answer. A 2xx
is only ever sent for a body committed to PostgreSQL (a receiver that is not spooled,
the browser beacon, commits its row before answering).

Worker (`process`): claim the batch → decompress → the receiver stores it → mark it
done, all in one transaction: a batch is stored whole or not at all, and a second
call finds it done.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.http import HttpRequest, HttpResponse

from portal.http import BodyError, read_body
from portal.logging import request_id_var
from telemetry.ingest import backlog
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.models import IngestBatch
from telemetry.receivers import RECEIVERS

logger = logging.getLogger(__name__)

UNAVAILABLE = "could not store the request; retry later"


def accept(request: HttpRequest, receiver: Receiver) -> HttpResponse:
    try:
        project = receiver.authenticate(request)
        receiver.check(request)
        key = _idempotency_key(request, receiver)
        if key:
            earlier = IngestBatch.objects.filter(project=project, idempotency_key=key).first()
            if earlier is not None:
                return receiver.answer(request, _replayed(earlier), earlier)
        if receiver.spooled and (reason := backlog.refusal(project.pk)):
            # Before the body is read: a refused request costs the portal almost nothing.
            raise receiver.overloaded(reason, settings.BACKLOG_RETRY_AFTER_SECONDS)
        encoding = request.headers.get("Content-Encoding", "")
        raw: list[bytes] = []
        body = read_body(request, encoding, receiver.max_bytes(), raw)
        with gc_paused():
            verdict = receiver.judge(request, project, body)
        batch = None
        if verdict.accepted and not receiver.spooled:
            with transaction.atomic():
                receiver.store_now(request, project, verdict)
        elif verdict.accepted:
            batch = IngestBatch.spool(
                project,
                body,
                kind=receiver.kind,
                encoding=encoding,
                raw=raw,
                params=verdict.params,
                idempotency_key=key,
                request_id=getattr(request, "request_id", ""),
                summary=verdict.summary,
                received_at=getattr(request, "received_at", None),
            )
        return receiver.answer(request, verdict, batch)
    except Refusal as refusal:
        return receiver.refuse(request, refusal)
    except BodyError as exc:
        return receiver.refuse(request, Refusal(exc.status, exc.message))
    except DatabaseError:
        # 503 is what every client library retries, after Retry-After.
        return receiver.refuse(request, Refusal(503, UNAVAILABLE, {"Retry-After": "5"}))


def _idempotency_key(request: HttpRequest, receiver: Receiver) -> str | None:
    if receiver.idempotency_prefix is None:
        return None
    key = request.headers.get("Idempotency-Key", "").strip()
    # Keys are unique per project across every spooled kind: namespaced, so an events
    # request and a metrics request that share a key never answer each other.
    prefix = receiver.idempotency_prefix
    key = key[: 200 - len(prefix)]
    return f"{prefix}{key}" if key else None


def _replayed(batch: IngestBatch) -> Verdict:
    return Verdict(accepted=batch.summary.get("accepted", 0), summary=batch.summary)


def process(batch_id: int) -> bool:
    """Store one spooled batch. Safe to call twice: the second call finds it done.

    Returns True when this call stored the batch. On an error nothing of the batch
    was stored (the transaction rolled back): the attempt is counted and the sweeper
    retries it.
    """
    try:
        with gc_paused():
            # The batch's items live and die in _store's frame: freed before the
            # collector resumes, rather than walked by it once more on the way out.
            return _store(batch_id)
    except Exception as exc:
        IngestBatch.objects.record_failure(batch_id, exc)
        raise


def _store(batch_id: int) -> bool:
    with transaction.atomic():
        with connection.cursor() as cursor:
            # The spool row is the durable record of the batch (the request's commit
            # waited for the disk before its answer). If this commit is lost in a
            # crash, its rows and the `done` go together and the batch, body intact,
            # is processed again: no need to wait for the WAL flush here.
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        batch = IngestBatch.objects.claim(batch_id)
        if batch is None:
            return False
        stored = RECEIVERS[batch.kind].store(batch, batch.read_body())
        batch.mark_done(stored)
        return True


def drain(kind: str, more: Callable[[], object] | None = None) -> int:
    """Store the pending batches of one kind, several per transaction, until none is
    left that another worker does not already hold; returns the batches stored.

    What the request's wake-up (telemetry/ingest/wakeup.py) asks for: one task per
    burst of requests rather than one per request. If a group fails, its transaction
    rolled back and nothing of it was stored: each batch of it is then stored on its
    own, so one bad batch is counted as failed and the others still go through.

    `more` asks for another drain, once, when the first round leaves batches waiting:
    a backlog of large batches is then stored by two workers, not one.
    """
    done = 0
    while True:
        try:
            with gc_paused():
                ids = _store_several(kind)
        except Exception:
            logger.warning("a group of %s batches failed; storing them one by one", kind)
            ids = _pending_ids(kind)
            for batch_id in ids:
                try:
                    done += process(batch_id)
                except Exception:
                    logger.exception("batch %s failed", batch_id)
            return done
        if not ids:
            return done
        if more is not None and not done and IngestBatch.objects.pending_after(kind, ids[-1]):
            more()
        done += len(ids)


def _store_several(kind: str) -> list[int]:
    receiver = RECEIVERS[kind]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")  # as in _store
        limit = settings.DRAIN_BATCHES if receiver.shares_transactions else 1
        batches = IngestBatch.objects.claim_pending(kind, limit, settings.DRAIN_BYTES)
        if not batches:
            return []
        bodies = IngestBatch.read_bodies(batches)
        # Log lines written while storing name the request that spooled the first.
        token = request_id_var.set(batches[0].request_id)
        try:
            stored = receiver.store_many(list(zip(batches, bodies, strict=True)))
        finally:
            request_id_var.reset(token)
        IngestBatch.objects.mark_done(batches, stored)
        return [batch.pk for batch in batches]


def _pending_ids(kind: str) -> list[int]:
    return list(
        IngestBatch.objects.filter(kind=kind, state=IngestBatch.State.PENDING)
        .order_by("id")
        .values_list("id", flat=True)[: settings.DRAIN_BATCHES]
    )


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is judged or stored.

    A batch allocates several containers per item and keeps them alive, so the
    collector would run every 700 allocations and walk the ever larger young heap
    for nothing (parsed JSON has no cycles); docs/performance.md has the cost.
    Memory is still freed by reference counting. Counted, so that one of several
    request threads finishing does not re-enable it under the others.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
