"""Ingestion endpoints. They authenticate, check limits, spool, and answer."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from ninja import Router, Schema, Status

from portal.api import project_auth
from runs.ingest import IngestError, gc_paused, judge_body, read_body, spool_body
from telemetry.models import IngestBatch

router = Router(tags=["ingest"])

EVENT_TYPES = {
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json",
    "text/plain",
}


class LineErrorOut(Schema):
    line: int
    error: str


class IngestOut(Schema):
    accepted: int
    rejected: int
    errors: list[LineErrorOut]
    batch: int | None


class ErrorOut(Schema):
    detail: str


_NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "Gitoma records `{ts, slug, phase, level, event, data}` plus optional run_id, "
            "seq, message, pid, host, request_id, trace_id, span_id: NDJSON (one per line) "
            "or a JSON array. May be sent with Content-Encoding gzip or deflate."
        ),
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
        },
    }
}


def _error(status: int, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status)


@router.post(
    "/ingest/events",
    auth=project_auth,
    response={202: IngestOut, 400: IngestOut | ErrorOut, 413: ErrorOut, 415: ErrorOut},
    openapi_extra=_NDJSON_BODY,
    summary="Ingest run events",
)
def ingest_events(request: HttpRequest, run_id: str = ""):
    """Accept a batch of run events. Durable before the answer; processed by a worker.

    Each line is judged on its own: good lines are kept, bad ones are listed in
    `errors` by line number. A record without `run_id` belongs to the run named by
    the `run_id` query parameter, else to the newest running run of its slug.
    Send an `Idempotency-Key` header to make retries of the same request a no-op.
    """
    project = request.auth
    if len(run_id) > 128:
        return _error(400, "run_id: longer than 128 characters")
    content_type = request.content_type or "application/x-ndjson"
    if content_type not in EVENT_TYPES:
        return _error(415, f"unsupported Content-Type {content_type!r}: send application/x-ndjson")

    key = request.headers.get("Idempotency-Key", "").strip()[:200] or None
    if key:
        earlier = IngestBatch.objects.filter(project=project, idempotency_key=key).first()
        if earlier is not None:
            return Status(202, {**earlier.summary, "batch": earlier.id})

    encoding = request.headers.get("Content-Encoding", "")
    raw: list[bytes] = []
    try:
        body = read_body(request, encoding, settings.INGEST_MAX_BYTES, raw)
        if not body.strip():
            return _error(400, "empty body: send one JSON record per line")
        with gc_paused():
            accepted, rejected, errors = judge_body(
                body,
                run_id,
                settings.INGEST_MAX_LINE_BYTES,
                settings.INGEST_MAX_ERRORS_REPORTED,
            )
    except IngestError as exc:
        return _error(exc.status, exc.message)

    summary = {"accepted": accepted, "rejected": rejected, "errors": errors}
    if not accepted:
        return Status(400, {**summary, "batch": None})
    batch = IngestBatch.spool(
        project,
        spool_body(body, encoding, raw),
        params={"run_id": run_id} if run_id else {},
        idempotency_key=key,
        request_id=getattr(request, "request_id", ""),
        summary=summary,
    )
    return Status(202, {**batch.summary, "batch": batch.id})
