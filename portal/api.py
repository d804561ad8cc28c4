"""The one django-ninja API: ingestion and reads, documented at /api/openapi.json."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer, django_auth

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
# Reads: an agent with its project's token, or an operator logged in to the portal.
read_auth = [project_auth, django_auth]

api = NinjaAPI(
    title="Runlens API",
    version="1",
    description="Ingest run traces from AI coding agents and read them back.",
    urls_namespace="api",
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
    return api.create_response(request, {"detail": exc.errors}, status=400)


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


@api.exception_handler(HttpError)
def http_error(request, exc):
    return api.create_response(request, {"detail": exc.message}, status=exc.status_code)


def _add_routers() -> None:
    from runs.api import router as runs_router
    from runs.metrics_api import router as metrics_router
    from telemetry.api import router as telemetry_router
    from telemetry.beacon import router as beacon_router

    api.add_router("/", telemetry_router)
    api.add_router("/", beacon_router)
    api.add_router("/", runs_router)
    api.add_router("/", metrics_router)


_add_routers()
