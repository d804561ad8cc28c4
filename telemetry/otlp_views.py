"""OTLP/HTTP endpoints: `POST /v1/logs`, `/v1/metrics`, `/v1/traces` (docs/otlp.md).

Plain views rather than the ninja API: bodies are protobuf as often as JSON and
are read as a stream, decompressed within OTLP_MAX_BYTES. Every answer, errors
included, is in the request's encoding: an Export*ServiceResponse, or a
`google.rpc.Status` (protobuf, or its JSON form `{"code", "message"}`).
"""

from __future__ import annotations

import orjson
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from google.rpc.status_pb2 import Status

from runs.ingest import IngestError, gc_paused, read_body, spool_body
from runs.models import Project
from telemetry import ratelimit
from telemetry.models import IngestBatch
from telemetry.otlp import codec, items

PROTOBUF, JSON = "application/x-protobuf", "application/json"
# Content type -> is it JSON? (`application/protobuf` is what some clients send.)
CONTENT_TYPES = {PROTOBUF: False, "application/protobuf": False, JSON: True}
# google.rpc.Code
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE, UNAUTHENTICATED = 3, 8, 12, 14, 16
RETRY_AFTER_UNAVAILABLE = "5"


def _status(http: int, code: int, message: str, json: bool, **headers: str) -> HttpResponse:
    if json:
        body, content_type = orjson.dumps({"code": code, "message": message}), JSON
    else:
        body, content_type = Status(code=code, message=message).SerializeToString(), PROTOBUF
    response = HttpResponse(body, status=http, content_type=content_type)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _unavailable(json: bool) -> HttpResponse:
    # 503 is one of the statuses OTLP exporters retry, after Retry-After.
    return _status(
        503,
        UNAVAILABLE,
        "could not store the request; retry later",
        json,
        Retry_After=RETRY_AFTER_UNAVAILABLE,
    )


def _project(request: HttpRequest) -> Project | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return Project.for_token(token.strip())


def _export(request: HttpRequest, signal: str) -> HttpResponse:
    json = CONTENT_TYPES.get(request.content_type or "", True)  # errors before judging it
    if request.method != "POST":
        response = _status(405, UNIMPLEMENTED, f"use POST /v1/{signal}", json)
        response["Allow"] = "POST"
        return response
    try:
        project = _project(request)
        verdict = ratelimit.hit_project(project.pk) if project is not None else None
    except DatabaseError:
        return _unavailable(json)
    if project is None:
        return _status(
            401,
            UNAUTHENTICATED,
            "missing or invalid token: send Authorization: Bearer <ingest token>",
            json,
            WWW_Authenticate="Bearer",
        )
    if verdict is not None and not verdict.allowed:
        message = (
            f"rate limit of {verdict.limit} write requests per minute for this project "
            f"exceeded; retry after {verdict.retry_after} s"
        )
        return _status(429, RESOURCE_EXHAUSTED, message, json, **verdict.headers())
    if request.content_type not in CONTENT_TYPES:
        return _status(
            415,
            INVALID_ARGUMENT,
            f"unsupported Content-Type {request.content_type!r}: send {PROTOBUF} or {JSON}",
            True,
        )
    json = CONTENT_TYPES[request.content_type]

    encoding = request.headers.get("Content-Encoding", "")
    raw: list[bytes] = []
    try:
        body = read_body(request, encoding, settings.OTLP_MAX_BYTES, raw)
        with gc_paused():
            decoded = codec.decode(signal, body, json, full=False)
            accepted = len(decoded.items)
            answer = codec.response_body(signal, decoded, json)
            error = decoded.error_message
            # Only the counts are kept (the worker decodes the spooled body again); the
            # items go now, before the collector resumes and would walk them.
            decoded.items.clear()
    except IngestError as exc:
        return _status(exc.status, INVALID_ARGUMENT, exc.message, json)
    except items.OtlpError as exc:
        return _status(400, INVALID_ARGUMENT, str(exc), json)

    if accepted:
        try:
            IngestBatch.spool(
                project,
                spool_body(body, encoding, raw),
                kind=items.BATCH_KIND[signal],
                params={"encoding": "json" if json else "protobuf"},
                request_id=getattr(request, "request_id", ""),
                summary={"accepted": accepted, "rejected": decoded.rejected, "error": error[:1000]},
            )
        except DatabaseError:
            return _unavailable(json)
    return HttpResponse(answer, status=200, content_type=JSON if json else PROTOBUF)


@csrf_exempt
def export_logs(request: HttpRequest) -> HttpResponse:
    """OTLP logs: each record becomes an event of its run."""
    return _export(request, items.LOGS)


@csrf_exempt
def export_metrics(request: HttpRequest) -> HttpResponse:
    """OTLP metrics: each data point becomes a run metric."""
    return _export(request, items.METRICS)


@csrf_exempt
def export_traces(request: HttpRequest) -> HttpResponse:
    """OTLP traces: each span is stored once, whatever the retries."""
    return _export(request, items.TRACES)
