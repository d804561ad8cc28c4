"""`POST /api/frontend-log`: the public error beacon of web apps.

static/runlens-beacon.js sends `window.onerror` and `unhandledrejection` here
with `navigator.sendBeacon` (a `text/plain` body, so no CORS preflight). The
endpoint is public: everything in the body is attacker-controlled, and the
limits (body size, requests per client address, allowed origins) come before
any work. A report is written directly, in one transaction, before the 202:
it is one small row and one group upsert, cheaper than a spool round trip.
"""

from __future__ import annotations

import json

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import Router, Schema

from portal.http import BodyError, read_body
from runs.models import Project, Run
from telemetry import errors, ratelimit
from telemetry.ratelimit import Verdict

router = Router(tags=["errors"])

BEACON_TYPES = {"", "text/plain", "application/json"}
EXPOSED = "X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining"


class BeaconOut(Schema):
    accepted: bool
    request_id: str


class DetailOut(Schema):
    detail: str


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


def allowed_origins(project: Project) -> set[str]:
    lines = project.allowed_origins.replace(",", "\n").splitlines()
    return {line.strip().rstrip("/").lower() for line in lines if line.strip()}


def origin_allowed(request: HttpRequest, project: Project, origin: str) -> bool:
    """The project's allowed origins (`*` for any), and the portal's own pages."""
    origin = origin.rstrip("/").lower()
    if origin == "null":  # sandboxed frames and file:// pages: never identifiable
        return "*" in allowed_origins(project)
    own = f"{request.scheme}://{request.get_host()}".lower()
    allowed = allowed_origins(project)
    return origin == own or origin in allowed or "*" in allowed


def beacon_project(key: str) -> Project | None:
    """The project named by ?key=, else the configured default (made on first use)."""
    if key:
        return Project.objects.filter(public_key=key[:64]).first()
    slug = settings.FRONTEND_LOG_DEFAULT_PROJECT
    if not slug:
        return None
    name = "Runlens portal" if slug == "portal" else slug
    return Project.objects.get_or_create(slug=slug, defaults={"name": name})[0]


def _answer(
    request: HttpRequest,
    status: int,
    body: dict | None,
    cors_origin: str = "",
    verdict: Verdict | None = None,
) -> HttpResponse:
    response = (
        JsonResponse(body, status=status) if body is not None else HttpResponse(status=status)
    )
    if cors_origin:
        response["Access-Control-Allow-Origin"] = cors_origin
        response["Access-Control-Expose-Headers"] = EXPOSED
    response["Vary"] = "Origin"
    if verdict is not None:
        for name, value in verdict.headers().items():
            response[name] = value
    return response


@router.api_operation(["OPTIONS"], "/frontend-log", include_in_schema=False)
def frontend_log_preflight(request: HttpRequest, key: str = ""):
    """CORS preflight (a fetch() with a JSON content type): the project's origins only."""
    project = beacon_project(key)
    origin = request.headers.get("Origin", "")
    if project is None or not origin or not origin_allowed(request, project, origin):
        return _answer(request, 403, {"detail": "origin not allowed for this project"})
    response = _answer(request, 204, None, cors_origin=origin)
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
)
def frontend_log(request: HttpRequest, key: str = ""):
    """Store one front-end error report and group it. Public; `?key=` names the project.

    Limits: FRONTEND_LOG_MAX_BYTES (413 beyond) and FRONTEND_LOG_RATE requests per
    minute per client address (429 with Retry-After). Browsers may call it from
    the project's allowed origins.
    """
    project = beacon_project(key)
    if project is None:
        detail = "unknown key" if key else "send ?key=<project public key>"
        return _answer(request, 403, {"detail": detail})
    origin = request.headers.get("Origin", "")
    allowed = not origin or origin_allowed(request, project, origin)
    cors = origin if origin and allowed else ""
    address = ratelimit.client_ip(request)

    def answer(status: int, body: dict) -> HttpResponse:
        return _answer(request, status, body, cors_origin=cors, verdict=verdict)

    verdict = ratelimit.hit(f"beacon:{ratelimit.ip_key(address)}", settings.FRONTEND_LOG_RATE)
    if verdict is not None and not verdict.allowed:
        seconds = verdict.retry_after
        return answer(429, {"detail": f"too many reports; retry after {seconds} s"})
    if not allowed:
        return answer(403, {"detail": "origin not allowed for this project"})
    if (request.content_type or "") not in BEACON_TYPES:
        return answer(415, {"detail": "send the report as text/plain or application/json"})
    try:
        raw = read_body(
            request, request.headers.get("Content-Encoding", ""), settings.FRONTEND_LOG_MAX_BYTES
        )
    except BodyError as exc:
        return answer(exc.status, {"detail": exc.message})
    body = _parse(raw)
    if not isinstance(body, dict):
        return answer(400, {"detail": "body must be one JSON object"})
    if not any(body.get(k) for k in ("message", "error", "stack")):
        return answer(400, {"detail": "nothing to report: send message, error or stack"})

    occurrence = errors.beacon_occurrence(
        body,
        client_address=address,
        request_id=request.request_id,
        run_id=_run_pk(project, body),
    )
    errors.store(project, [occurrence])
    return answer(202, {"accepted": True, "request_id": request.request_id})


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
