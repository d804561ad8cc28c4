"""Sentry's endpoints: `POST /api/<project id>/envelope/` and `/store/` (slash optional).

Plain views rather than the ninja API, like OTLP's: envelopes are not JSON, and SDKs
send them with their own content types (`application/x-sentry-envelope`, browsers
`text/plain`). telemetry/receivers/sentry.py says how to judge, answer and store them.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from runs.models import Project
from telemetry.ingest import pipeline
from telemetry.ingest.cors import allow_origin, origin_allowed
from telemetry.receivers import sentry


@csrf_exempt
def ingest(request: HttpRequest, project_id: str, endpoint: str) -> HttpResponse:
    request.sentry_project_id = int(project_id)
    request.sentry_endpoint = endpoint
    if request.method == "OPTIONS":
        return _preflight(request, int(project_id))
    if request.method != "POST":
        response = JsonResponse({"detail": f"use POST /api/{project_id}/{endpoint}/"}, status=405)
        response["Allow"] = "POST, OPTIONS"
        return response
    return pipeline.accept(request, sentry.receiver)


def _preflight(request: HttpRequest, project_id: int) -> HttpResponse:
    """CORS preflight of a browser SDK sending with custom headers: the project's origins."""
    project = Project.objects.filter(pk=project_id).first()
    origin = request.headers.get("Origin", "")
    if project is None or not origin or not origin_allowed(request, project, origin):
        return JsonResponse({"detail": "origin not allowed for this project"}, status=403)
    response = allow_origin(HttpResponse(status=204), origin, sentry.EXPOSED)
    response["Access-Control-Allow-Methods"] = "POST, OPTIONS"
    response["Access-Control-Allow-Headers"] = (
        "Content-Type, Content-Encoding, X-Sentry-Auth, sentry-trace, baggage"
    )
    response["Access-Control-Max-Age"] = "86400"
    return response
