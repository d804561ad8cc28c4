"""The one django-ninja API: ingestion and reads, documented at /api/openapi.json."""

from __future__ import annotations

import copy
import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.openapi.docs import DocsBase
from ninja.security import HttpBearer, django_auth

from portal import openapi
from portal.http import DATABASE_RETRY_AFTER_S, BodyError, allow_methods
from runs.models import Project
from telemetry import ratelimit


class ProjectBearer(HttpBearer):
    """`Authorization: Bearer <ingest token>` -> the token's Project.

    Write requests also count against the project's ingest rate limit here, so
    every token endpoint (events, heartbeats, metrics, artifacts) is limited
    alike, before its body is read.
    """

    def authenticate(self, request: HttpRequest, token: str) -> Project | None:
        project = Project.for_token(token.strip())
        if project is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
            verdict = ratelimit.hit_project(project.pk)
            if verdict is not None and not verdict.allowed:
                raise ratelimit.RateLimited(verdict)
        return project


project_auth = ProjectBearer()
logger = logging.getLogger(__name__)
# Reads: an agent with its project's token, or an operator logged in to the portal.
read_auth = [project_auth, django_auth]


def _otlp_path(signal: str, request: str, rejected: str) -> dict:
    body = {"schema": {"type": "string", "format": "binary"}}
    answer = f"Export{request}ServiceResponse, in the request's encoding"
    status = "google.rpc.Status ({code, message} in JSON), in the request's encoding"
    return {
        "post": {
            "tags": ["otlp"],
            "summary": f"OTLP/HTTP {signal}",
            "description": (
                f"An OpenTelemetry Export{request}ServiceRequest, protobuf or OTLP/JSON, "
                "optionally gzip or deflate; limited after decompression (OTLP_MAX_BYTES). "
                "Durable before the answer. A plain view, not part of the ninja router: "
                "see docs/otlp.md."
            ),
            "security": [{"ProjectBearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/x-protobuf": body, "application/json": body},
            },
            "responses": {
                "200": {
                    "description": f"{answer}; `partial_success.{rejected}` when some "
                    "items were rejected"
                },
                "400": {"description": f"undecodable body: {status}"},
                "401": {"description": f"missing or invalid token: {status}"},
                "405": {"description": "not POST"},
                "413": {"description": f"larger than OTLP_MAX_BYTES once decompressed: {status}"},
                "415": {"description": "unknown Content-Type or Content-Encoding"},
                "429": {"description": "project rate limit; Retry-After"},
                "503": {
                    "description": "the spool could not take the request, or its backlog is "
                    "past its bound (docs/reliability.md); Retry-After"
                },
            },
        }
    }


def _sentry_path(endpoint: str, body: str) -> dict:
    answer = "a JSON `detail` naming the problem"
    return {
        "post": {
            "tags": ["sentry"],
            "summary": f"Sentry {endpoint} (what SDKs send to their DSN)",
            "description": (
                f"{body} Trailing slash optional. The project's public key from "
                "`X-Sentry-Auth`, `?sentry_key=` or the envelope header's `dsn`. gzip, deflate, "
                "br or zstd, limited after decompression (SENTRY_MAX_BYTES). Durable before the "
                "answer. A plain view: see docs/sentry.md."
            ),
            "parameters": [
                {
                    "name": "project_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer"},
                },
                {
                    "name": "sentry_key",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-sentry-envelope": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "object"}},
                    "text/plain": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "200": {"description": '{"id": "<event id>"}, once stored durably'},
                "400": {"description": f"malformed envelope or event: {answer}"},
                "401": {"description": f"no key: {answer}"},
                "403": {"description": f"a key, project or origin that does not match: {answer}"},
                "404": {"description": "a project id that is not 1 to 18 digits: no such URL"},
                "413": {"description": f"larger than SENTRY_MAX_BYTES once decompressed: {answer}"},
                "415": {"description": "unknown Content-Encoding"},
                "429": {
                    "description": "project rate limit, or the spool's backlog past its "
                    "bound; Retry-After and X-Sentry-Rate-Limits "
                    "(`<seconds>::project:quota_exceeded` or `…:backlog`)"
                },
                "503": {"description": "the spool could not take the request; Retry-After"},
            },
        }
    }


# Endpoints served by plain Django views (their bodies are protobuf, or their answers
# are not JSON), documented here so that /api/openapi.json lists every endpoint.
PLAIN_PATHS = {
    "/v1/logs": _otlp_path("logs", "Logs", "rejected_log_records"),
    "/v1/metrics": _otlp_path("metrics", "Metrics", "rejected_data_points"),
    "/v1/traces": _otlp_path("traces", "Trace", "rejected_spans"),
    "/api/{project_id}/envelope/": _sentry_path(
        "envelope", "A Sentry envelope: events, transactions, other items (skipped)."
    ),
    "/api/{project_id}/store/": _sentry_path("store", "One Sentry event as JSON (older clients)."),
    "/health": {
        "get": {
            "tags": ["operations"],
            "summary": "Health with counters",
            "description": "No login. docs/operations.md describes every field.",
            "responses": {
                "200": {
                    "description": "status ok or degraded, version, commit, "
                    "uptime_seconds, db_ok, broker_ok, metrics{…}"
                },
                "503": {"description": "the database is unreachable (status down)"},
            },
        }
    },
    "/health/live": {
        "get": {
            "tags": ["operations"],
            "summary": "Process liveness (no database, no broker)",
            "responses": {"200": {"description": '{"status": "ok", "uptime_seconds": …}'}},
        }
    },
    "/metrics": {
        "get": {
            "tags": ["operations"],
            "summary": "Prometheus exposition (OpenMetrics when Accept asks for it)",
            "description": "METRICS_TOKEN bearer, a logged-in operator, or this machine.",
            "responses": {
                "200": {
                    "description": "text/plain; version=0.0.4, or application/openmetrics-text"
                },
                "401": {"description": "none of the above"},
            },
        }
    },
}


class DetailOut(Schema):
    """Every refusal of the API (portal/openapi.py: `Detail`)."""

    detail: str


class RunlensAPI(NinjaAPI):
    def get_openapi_schema(self, *, path_prefix=None, path_params=None):
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schema["paths"].update(copy.deepcopy(PLAIN_PATHS))
        return openapi.complete(schema, set(PLAIN_PATHS))


class StaticSwagger(DocsBase):
    """/api/docs: Swagger UI served from static/ (vendored from npm's swagger-ui-dist,
    static/vendor/swagger-ui-5.35.0), started by a script file: ninja's own page loads
    it from a CDN with an inline script, both blocked by our Content-Security-Policy."""

    def render_page(self, request: HttpRequest, api: NinjaAPI, **kwargs) -> HttpResponse:
        return render(request, "portal/api_docs.html")


api = RunlensAPI(
    title="Runlens API",
    version="1",
    description="Ingest run traces from AI coding agents and read them back.",
    urls_namespace="api",
    docs=StaticSwagger(),
    docs_decorator=allow_methods("GET"),
)


@api.exception_handler(AuthenticationError)
def unauthorized(request, exc):
    return api.create_response(
        request,
        {"detail": "missing or invalid token: send Authorization: Bearer <ingest token>"},
        status=401,
    )


@api.exception_handler(ValidationError)
def invalid(request, exc):
    # The one shape of a 400: `detail` a sentence, and here each problem in `errors`.
    problems = "; ".join(_problem(error) for error in exc.errors[:5])
    return api.create_response(
        request, {"detail": problems or "invalid request", "errors": exc.errors}, status=400
    )


def _problem(error: dict) -> str:
    # ("query", "limit") -> "limit"; ("body", "payload", "pid") -> "pid".
    where = [str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body")]
    where = [part for part in where if part not in ("payload", "q")] or where
    return f"{'.'.join(where) or 'request'}: {error.get('msg', 'invalid')}"


@api.exception_handler(ratelimit.RateLimited)
def rate_limited(request, exc):
    verdict = exc.verdict
    response = api.create_response(
        request,
        {
            "detail": f"rate limit of {verdict.limit} write requests per minute for this "
            f"project exceeded; retry after {verdict.retry_after} s"
        },
        status=429,
    )
    for name, value in verdict.headers().items():
        response[name] = value
    return response


@api.exception_handler(BodyError)
def body_refused(request, exc):
    # A chunked body past DATA_UPLOAD_MAX_MEMORY_SIZE or malformed, read by request.body.
    return api.create_response(request, {"detail": exc.message}, status=exc.status)


@api.exception_handler(RequestDataTooBig)
def too_big(request, exc):
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return api.create_response(request, {"detail": f"body larger than {limit} bytes"}, status=413)


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def database_unavailable(request, exc):
    # PostgreSQL cannot be reached or went away (a restart, a failover): the token check
    # or the view could not query it. 503 with Retry-After, as the spool answers when it
    # cannot commit (telemetry/ingest/pipeline.py): every client library retries that,
    # while OTLP exporters drop a 500 (they retry 429, 502, 503 and 504 only).
    logger.warning("database unavailable: %s", exc)
    response = api.create_response(
        request, {"detail": "the database is unavailable; retry later"}, status=503
    )
    response["Retry-After"] = DATABASE_RETRY_AFTER_S
    return response


@api.exception_handler(HttpError)
def http_error(request, exc):
    return api.create_response(request, {"detail": exc.message}, status=exc.status_code)


def _add_routers() -> None:
    from runs.api import router as runs_router
    from runs.metrics_api import router as metrics_router
    from telemetry.api import router as telemetry_router
    from telemetry.read_api import router as telemetry_read_router

    api.add_router("/", telemetry_router)
    api.add_router("/", runs_router)
    api.add_router("/", metrics_router)
    api.add_router("/", telemetry_read_router)


_add_routers()
