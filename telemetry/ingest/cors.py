"""Which browser origins may send to a project (the beacon, Sentry's browser SDK)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from runs.models import Project


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


def allow_origin(response: HttpResponse, origin: str, exposed: str) -> HttpResponse:
    """Let the page at `origin` read the answer and the `exposed` headers."""
    if origin:
        response["Access-Control-Allow-Origin"] = origin
        response["Access-Control-Expose-Headers"] = exposed
    response["Vary"] = "Origin"
    return response
