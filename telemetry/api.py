"""Ingest endpoints of the ninja API: their schemas for /api/openapi.json, and one
call into the pipeline each (telemetry/ingest/pipeline.py does the rest)."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router, Schema

from portal.api import DetailOut, project_auth
from telemetry.ingest import pipeline
from telemetry.ingest.cors import origin_allowed
from telemetry.receivers import beacon, events, metrics

router = Router(tags=["ingest"])


class LineErrorOut(Schema):
    line: int
    error: str


class IngestOut(Schema):
    accepted: int
    rejected: int
    errors: list[LineErrorOut]
    batch: int | None


class IngestRefusedOut(IngestOut):
    detail: str  # nothing was accepted: the lines' errors say why


class ItemErrorOut(Schema):
    index: int
    error: str


class RecordOut(Schema):
    accepted: int
    rejected: int
    errors: list[ItemErrorOut]
    batch: int | None


_NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "Gitoma records `{ts, slug, phase, level, event, data}` plus optional run_id, "
            "seq, message, pid, host, request_id, trace_id, span_id: NDJSON (one per line) "
            "or a JSON array. May be sent with Content-Encoding gzip or deflate."
        ),
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "minLength": 1}},
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}, "minItems": 1}
            },
        },
    }
}

_RECORD_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "One metric `{run_id?, metric_name, metric_value, recorded_at?, labels?, unit?}` "
            'or a batch `{"metrics": [...]}` (also a plain JSON array). May be sent with '
            "Content-Encoding gzip or deflate."
        ),
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


class RecordRefusedOut(RecordOut):
    detail: str  # nothing was accepted: the items' errors say why


_ANSWERS = {413: DetailOut, 415: DetailOut, 503: DetailOut}


@router.post(
    "/ingest/events",
    auth=project_auth,
    response={202: IngestOut, 400: IngestRefusedOut | DetailOut, **_ANSWERS},
    openapi_extra=_NDJSON_BODY,
    summary="Ingest run events",
)
def ingest_events(request: HttpRequest, run_id: str = ""):
    """Accept a batch of run events. Durable before the answer; processed by a worker.

    Each line is judged on its own: good lines are kept, bad ones are listed in
    `errors` by line number. A record without `run_id` belongs to the run named by
    the `run_id` query parameter, else to the newest running run of its slug.
    Run ids must not contain `/` (they are part of URLs). Send an `Idempotency-Key`
    header to make retries of the same request a no-op.
    """
    return pipeline.accept(request, events.receiver)


@router.post(
    "/metrics/record",
    auth=project_auth,
    response={202: RecordOut, 400: RecordRefusedOut | DetailOut, **_ANSWERS},
    openapi_extra=_RECORD_BODY,
    summary="Record run metrics",
    tags=["metrics"],
)
def record_metrics(request: HttpRequest):
    """Accept one metric or a batch. Durable before the answer; stored by a worker.

    Each item is judged on its own: good ones are kept, bad ones are listed in
    `errors` by their index in the batch (0-based). A `run_id` must name a run of
    this project; an item without one is a fleet metric. Send an `Idempotency-Key`
    header to make retries of the same request a no-op.
    """
    return pipeline.accept(request, metrics.receiver)


# --- The browser beacon ---------------------------------------------------------


class BeaconOut(Schema):
    accepted: bool
    request_id: str


_BEACON_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "`{level, message, error, stack, context: {url, ua, build}}`; other fields are "
            "kept in the context. Sent as text/plain by navigator.sendBeacon, or as JSON."
        ),
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


@router.api_operation(["OPTIONS"], "/frontend-log", include_in_schema=False)
def frontend_log_preflight(request: HttpRequest, key: str = ""):
    """CORS preflight (a fetch() with a JSON content type): the project's origins only."""
    project = beacon.beacon_project(key)
    origin = request.headers.get("Origin", "")
    if project is None or not origin or not origin_allowed(request, project, origin):
        return beacon.beacon_response(
            request, 403, {"detail": "origin not allowed for this project"}
        )
    response = beacon.beacon_response(request, 204, None, cors_origin=origin)
    response["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response["Access-Control-Allow-Headers"] = "Content-Type, X-Request-ID"
    response["Access-Control-Max-Age"] = "86400"
    return response


@router.post(
    "/frontend-log",
    response={
        202: BeaconOut,
        400: DetailOut,
        403: DetailOut,
        413: DetailOut,
        415: DetailOut,
        429: DetailOut,
    },
    openapi_extra=_BEACON_BODY,
    summary="Report a front-end error (public beacon)",
    tags=["errors"],
)
def frontend_log(request: HttpRequest, key: str = ""):
    """Store one front-end error report and group it. Public; `?key=` names the project.

    Limits: FRONTEND_LOG_MAX_BYTES (413 beyond) and FRONTEND_LOG_RATE requests per
    minute per client address (429 with Retry-After). Browsers may call it from
    the project's allowed origins.
    """
    return pipeline.accept(request, beacon.receiver)
