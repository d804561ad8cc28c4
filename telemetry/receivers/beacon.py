"""`POST /api/frontend-log`: the public error beacon of web apps.

static/runlens-beacon.js sends `window.onerror` and `unhandledrejection` here with
`navigator.sendBeacon` (a `text/plain` body, so no CORS preflight). The endpoint is
public: everything in the body is attacker-controlled, and the limits (body size,
requests per client address, allowed origins) come before any work. Not spooled: a
report is one small row and one group upsert, written in the request's transaction
before the 202, cheaper than a spool round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from runs.models import Project, Run
from telemetry import errors, ratelimit
from telemetry.ingest.cors import allow_origin, origin_allowed
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.ratelimit import Verdict as RateVerdict

CONTENT_TYPES = {"", "text/plain", "application/json"}
EXPOSED = "X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining"


@dataclass
class Caller:
    """Who sent a beacon request: what every answer to it carries (CORS, rate headers)."""

    address: str
    cors_origin: str = ""
    rate: RateVerdict | None = None


def beacon_project(key: str) -> Project | None:
    """The project named by ?key=, else the configured default (made on first use)."""
    if key:
        return Project.objects.filter(public_key=key[:64]).first()
    slug = settings.FRONTEND_LOG_DEFAULT_PROJECT
    if not slug:
        return None
    name = "Runlens portal" if slug == "portal" else slug
    return Project.objects.get_or_create(slug=slug, defaults={"name": name})[0]


def beacon_response(
    request: HttpRequest,
    status: int,
    body: dict | None,
    cors_origin: str = "",
    verdict: RateVerdict | None = None,
) -> HttpResponse:
    response = (
        JsonResponse(body, status=status) if body is not None else HttpResponse(status=status)
    )
    allow_origin(response, cors_origin, EXPOSED)
    if verdict is not None:
        for name, value in verdict.headers().items():
            response[name] = value
    return response


class BeaconReceiver(Receiver):
    kind = "beacon"
    spooled = False

    def max_bytes(self) -> int:
        return settings.FRONTEND_LOG_MAX_BYTES

    def authenticate(self, request: HttpRequest) -> Project:
        key = request.GET.get("key", "")
        request.beacon_caller = caller = Caller(ratelimit.client_ip(request))
        project = beacon_project(key)
        if project is None:
            raise Refusal(403, "unknown key" if key else "send ?key=<project public key>")
        origin = request.headers.get("Origin", "")
        allowed = not origin or origin_allowed(request, project, origin)
        caller.cors_origin = origin if origin and allowed else ""
        caller.rate = ratelimit.hit(
            f"beacon:{ratelimit.ip_key(caller.address)}", settings.FRONTEND_LOG_RATE
        )
        if caller.rate is not None and not caller.rate.allowed:
            raise Refusal(429, f"too many reports; retry after {caller.rate.retry_after} s")
        if not allowed:
            raise Refusal(403, "origin not allowed for this project")
        return project

    def check(self, request: HttpRequest) -> None:
        if (request.content_type or "") not in CONTENT_TYPES:
            raise Refusal(415, "send the report as text/plain or application/json")

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        report = _parse(body)
        if not isinstance(report, dict):
            raise Refusal(400, "body must be one JSON object")
        if not any(report.get(k) for k in ("message", "error", "stack")):
            raise Refusal(400, "nothing to report: send message, error or stack")
        return Verdict(1, items=[report])

    def store_now(self, request: HttpRequest, project: Project, verdict: Verdict) -> None:
        (report,) = verdict.items
        occurrence = errors.beacon_occurrence(
            report,
            client_address=request.beacon_caller.address,
            request_id=request.request_id,
            run_id=_run_pk(project, report),
        )
        errors.store(project, [occurrence])

    def answer(self, request: HttpRequest, verdict: Verdict, batch=None) -> HttpResponse:
        return self._respond(request, 202, {"accepted": True, "request_id": request.request_id})

    def refuse(self, request: HttpRequest, refusal: Refusal) -> HttpResponse:
        response = self._respond(request, refusal.status, {"detail": refusal.message})
        for name, value in refusal.headers.items():
            response[name] = value
        return response

    def _respond(self, request: HttpRequest, status: int, body: dict) -> HttpResponse:
        caller = getattr(request, "beacon_caller", None)
        if caller is None:
            return beacon_response(request, status, body)
        return beacon_response(request, status, body, caller.cors_origin, caller.rate)


receiver = BeaconReceiver()


def _parse(raw: bytes):
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses lone surrogates and invalid UTF-8 that browsers can send; the
    # stdlib accepts them (the scrubber cleans them). NaN and Infinity: not JSONB.
    try:
        return json.loads(raw.decode("utf-8", "replace"), parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        return None


def _run_pk(project: Project, body: dict) -> int | None:
    """A web UI of an agent may name the run it shows: the report links to it."""
    context = body.get("context")
    run_id = context.get("run_id") if isinstance(context, dict) else None
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 128:
        return None
    return Run.objects.filter(project=project, run_id=run_id).values_list("pk", flat=True).first()
