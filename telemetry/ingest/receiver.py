"""What a protocol declares to come in through the pipeline (telemetry/ingest/pipeline.py).

A receiver names its batch kind and body limit, says who is sending (`authenticate`),
whether it can read the request (`check`), judges a body (`judge`: how many items it
accepts, what to answer), words answers in its protocol (`answer`, `refuse`), and
stores a spooled batch inside the worker's transaction (`store`; `store_now` for the
one receiver that writes before answering). Receivers live in telemetry/receivers/,
one module a protocol, listed in its RECEIVERS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import Status

from runs.models import Project
from telemetry.models import IngestBatch


class Refusal(Exception):
    """The whole request is refused: an HTTP status, a message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Verdict:
    """A receiver's judgement of one body."""

    accepted: int
    # What the answer says (and an Idempotency-Key retry says again): kept on the batch.
    summary: dict = field(default_factory=dict)
    # What changes the body's meaning for the worker (a default run id, …).
    params: dict = field(default_factory=dict)
    # The answer's body, when the protocol writes it while judging (OTLP).
    response: bytes = b""
    # What a receiver that stores at once (not spooled) judged, for `store_now`.
    items: list = field(default_factory=list)


class Receiver:
    kind: str = ""  # IngestBatch.Kind
    # Spooled receivers answer once the body is durable and a worker stores it; one
    # that is not (the browser beacon: one small row) stores before answering.
    spooled: bool = True
    # Whether the worker stores several pending batches of this kind in one transaction
    # (store_many). Worth it for one-event requests (Sentry); a batch of run events
    # locks its runs, and two workers each holding many batches' runs wait on each
    # other: events and OTLP keep a transaction a batch (docs/performance.md).
    shares_transactions: bool = False
    # An idempotency key namespace, or "" when the protocol has none.
    idempotency_prefix: str | None = None

    def max_bytes(self) -> int:
        raise NotImplementedError

    def authenticate(self, request: HttpRequest) -> Project:
        """The sending project. The default: django-ninja's `project_auth` already did it."""
        return request.auth

    def check(self, request: HttpRequest) -> None:
        """Refuse what cannot be read (content type); the body is not read yet."""

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        raise NotImplementedError

    def answer(self, request: HttpRequest, verdict: Verdict, batch: IngestBatch | None):
        """The token endpoints' answer: 202 with the batch's summary, or 400 with the
        verdict's when no item was accepted (nothing was spooled)."""
        if batch is None:
            rejected = verdict.summary.get("rejected", 0)
            detail = f"nothing accepted: {rejected} rejected, see errors"
            return Status(400, {"detail": detail, **verdict.summary, "batch": None})
        return Status(202, {**batch.summary, "batch": batch.id})

    def overloaded(self, reason: str, retry_after: int) -> Refusal:
        """The refusal of a request while the spool is past its bound
        (telemetry/ingest/backlog.py): 503 with Retry-After, which OTLP exporters and
        HTTP clients retry after waiting. Sentry says it with a 429 instead."""
        return Refusal(
            503, f"{reason}; retry after {retry_after} s", {"Retry-After": str(retry_after)}
        )

    def refuse(self, request: HttpRequest, refusal: Refusal) -> HttpResponse:
        response = JsonResponse({"detail": refusal.message}, status=refusal.status)
        for name, value in refusal.headers.items():
            response[name] = value
        return response

    def store(self, batch: IngestBatch, body: bytes) -> int:
        """Store one spooled body inside the worker's transaction; the items stored."""
        raise NotImplementedError

    def store_many(self, batches: list[tuple[IngestBatch, bytes]]) -> list[int]:
        """Store several spooled bodies of this kind inside one worker transaction; the
        items stored of each. A protocol whose requests are small overrides it to
        share the statements between them (Sentry: one event a request)."""
        return [self.store(batch, body) for batch, body in batches]

    def store_now(self, request: HttpRequest, project: Project, verdict: Verdict) -> None:
        """A receiver that is not spooled stores what it judged, in the request's
        transaction, before the answer."""
        raise NotImplementedError
