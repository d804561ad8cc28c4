"""OTLP/HTTP: `POST /v1/logs`, `/v1/metrics`, `/v1/traces` (docs/otlp.md).

Bodies are protobuf or OTLP/JSON, by Content-Type. Every answer, errors included,
is in the request's encoding: an Export*ServiceResponse, or a `google.rpc.Status`
(protobuf, or its JSON form `{"code", "message"}`). Decoding, mapping and storing
live in the telemetry/otlp package; this module is the protocol's door.
"""

from __future__ import annotations

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from google.rpc.status_pb2 import Status

from runs.models import Project
from telemetry import ratelimit
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.models import IngestBatch
from telemetry.otlp import codec, items, store

PROTOBUF, JSON = "application/x-protobuf", "application/json"
# Content type -> is it JSON? (`application/protobuf` is what some clients send.)
CONTENT_TYPES = {PROTOBUF: False, "application/protobuf": False, JSON: True}
# google.rpc.Code, by the HTTP status it goes with.
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE, UNAUTHENTICATED = 3, 8, 12, 14, 16
RPC_CODES = {401: UNAUTHENTICATED, 405: UNIMPLEMENTED, 429: RESOURCE_EXHAUSTED, 503: UNAVAILABLE}


def is_json(request: HttpRequest) -> bool:
    # Answers before the content type is judged are JSON when it is unknown.
    return CONTENT_TYPES.get(request.content_type or "", True)


def status_response(request: HttpRequest, refusal: Refusal) -> HttpResponse:
    code = RPC_CODES.get(refusal.status, INVALID_ARGUMENT)
    if is_json(request):
        body, content_type = orjson.dumps({"code": code, "message": refusal.message}), JSON
    else:
        body = Status(code=code, message=refusal.message).SerializeToString()
        content_type = PROTOBUF
    response = HttpResponse(body, status=refusal.status, content_type=content_type)
    for name, value in refusal.headers.items():
        response[name] = value
    return response


class OtlpReceiver(Receiver):
    def __init__(self, signal: str, store_batch):
        self.signal = signal
        self.kind = items.BATCH_KIND[signal]
        self.store_batch = store_batch

    def max_bytes(self) -> int:
        return settings.OTLP_MAX_BYTES

    def authenticate(self, request: HttpRequest) -> Project:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        project = Project.for_token(token.strip()) if scheme.lower() == "bearer" else None
        if project is None:
            raise Refusal(
                401,
                "missing or invalid token: send Authorization: Bearer <ingest token>",
                {"WWW-Authenticate": "Bearer"},
            )
        verdict = ratelimit.hit_project(project.pk)
        if verdict is not None and not verdict.allowed:
            message = (
                f"rate limit of {verdict.limit} write requests per minute for this project "
                f"exceeded; retry after {verdict.retry_after} s"
            )
            raise Refusal(429, message, verdict.headers())
        return project

    def check(self, request: HttpRequest) -> None:
        if request.content_type not in CONTENT_TYPES:
            raise Refusal(
                415,
                f"unsupported Content-Type {request.content_type!r}: send {PROTOBUF} or {JSON}",
            )

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        json = is_json(request)
        try:
            decoded = codec.decode(self.signal, body, json, full=False)
        except items.OtlpError as exc:
            raise Refusal(400, str(exc)) from None
        response = codec.response_body(self.signal, decoded, json)
        summary = {
            "accepted": len(decoded.items),
            "rejected": decoded.rejected,
            "error": decoded.error_message[:1000],
        }
        # Only the counts are kept (the worker decodes the spooled body again); the
        # items go now, before the collector resumes and would walk them.
        decoded.items.clear()
        params = {"encoding": "json" if json else "protobuf"}
        return Verdict(summary["accepted"], summary, params, response)

    def answer(self, request: HttpRequest, verdict: Verdict, batch: IngestBatch | None):
        content_type = JSON if is_json(request) else PROTOBUF
        return HttpResponse(verdict.response, status=200, content_type=content_type)

    def refuse(self, request: HttpRequest, refusal: Refusal) -> HttpResponse:
        return status_response(request, refusal)

    def store(self, batch: IngestBatch, body: bytes) -> int:
        return self.store_batch(batch, body)


logs = OtlpReceiver(items.LOGS, store.store_logs_batch)
metrics = OtlpReceiver(items.METRICS, store.store_metrics_batch)
traces = OtlpReceiver(items.TRACES, store.store_traces_batch)
