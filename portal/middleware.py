"""Request ids, request log lines, NUL characters in URLs and the Content Security Policy."""

from __future__ import annotations

import logging
import re
import time

from django.conf import settings
from django.http import FileResponse, JsonResponse

from portal.db import reading_from_replica, stream_from_replica
from portal.logging import request_id_var
from runs.ids import uuid7

_SANE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")

request_logger = logging.getLogger("runlens.request")


def is_health_path(path: str) -> bool:
    return path == "/health" or path.startswith("/health/")


class RequestIdMiddleware:
    """Takes X-Request-ID from the request when sane, else a new UUIDv7; echoes it.

    While the request runs, the id is in `request_id_var`, so every log line of
    the request and every task it enqueues carries it. With LOG_REQUESTS (and
    LOG_HEALTH_REQUESTS for /health) it also logs one line per request.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _SANE.match(incoming) else str(uuid7())
        request.request_id = request_id
        token = request_id_var.set(request_id)
        started = time.monotonic()
        try:
            response = self.get_response(request)
            if self._should_log(request.path):
                request_logger.info(
                    "%s %s %s",
                    request.method,
                    request.path,
                    response.status_code,
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": response.status_code,
                        "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    },
                )
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request_id
        return response

    @staticmethod
    def _should_log(path: str) -> bool:
        if is_health_path(path):
            return settings.LOG_HEALTH_REQUESTS
        return settings.LOG_REQUESTS


class RefuseNulInUrlMiddleware:
    """A NUL character in the path or the query string gets a 400 naming it.

    PostgreSQL refuses NUL in text, so a `?q=%00` that reached a filter would raise
    in the database driver and answer 500. Refusing it here covers every page and
    endpoint at once, those to come included.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in request.path or ("%00" in query or "\x00" in query):
            return JsonResponse(
                {"detail": "the URL contains a NUL character (%00): remove it"}, status=400
            )
        return self.get_response(request)


class ContentSecurityPolicyMiddleware:
    """A strict CSP on every HTML answer (the admin included)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.get("Content-Type", "").startswith("text/html"):
            policy = settings.CONTENT_SECURITY_POLICY
            if request.path.startswith("/admin/"):
                # Django's admin sets inline style attributes; scripts stay strict.
                policy = policy.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
            response.setdefault("Content-Security-Policy", policy)
        return response


def reads_from_replica(path: str) -> bool:
    """Paths whose GETs may read from the replica: pages, read APIs, exports. Not the
    admin (triage reads what it just wrote), nor /health, /status and /metrics (they
    report on the primary), nor static files."""
    return not (
        is_health_path(path)
        or path in ("/metrics", "/status")
        or path.startswith(("/admin/", "/static/", "/login/", "/logout/"))
    )


class ReadReplicaMiddleware:
    """GET and HEAD requests of pages, read APIs and exports read from DATABASE_READ_URL's
    replica (portal.db.ReadReplicaRouter); every other request, and every worker, reads
    from the primary. Without a replica this changes nothing."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method not in ("GET", "HEAD") or not reads_from_replica(request.path):
            return self.get_response(request)
        with reading_from_replica():
            response = self.get_response(request)
        if response.streaming and not isinstance(response, FileResponse):
            response.streaming_content = stream_from_replica(response.streaming_content)
        return response
