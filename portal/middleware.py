"""Request bodies, request ids, request log lines, NUL characters in URLs and the
Content Security Policy."""

from __future__ import annotations

import logging
import re
import time

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import FileResponse, HttpResponse, JsonResponse

from portal import http
from portal.db import reading_from_replica, stream_from_replica
from portal.logging import request_id_var
from runs.ids import uuid7

_SANE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")

request_logger = logging.getLogger("runlens.request")
logger = logging.getLogger(__name__)


def is_health_path(path: str) -> bool:
    return path == "/health" or path.startswith("/health/")


class RequestBodyMiddleware:
    """Frames every request body and leaves the connection fit for the next request.

    Before the view: the body is read to its Content-Length, or, chunked, to its end
    when the server decoded it (gunicorn does); a server that cannot (runserver)
    gets 411, never a body read as empty. After the view: a body it left unread (an
    early 401, 413, 415 or 429) is drained up to DRAIN_BYTES so that the kept-alive
    connection stays usable; beyond that the server is told to close it, so the
    answer says `Connection: close` rather than promising a connection it drops.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        body = self._framed(request)
        if body is None:
            http.close_connection()
            return JsonResponse(
                {"detail": "this server cannot read a chunked body: send Content-Length"},
                status=411,
            )
        request._stream = body
        response = self.get_response(request)
        if not body.drain():
            http.close_connection()
        return response

    @staticmethod
    def _framed(request) -> http.RequestInput | None:
        environ = request.META
        stream = environ["wsgi.input"]
        if "HTTP_TRANSFER_ENCODING" in environ:
            if not environ.get("wsgi.input_terminated"):
                return None
            return http.RequestInput(stream, None, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        try:
            length = max(0, int(environ.get("CONTENT_LENGTH") or 0))
        except ValueError:
            length = 0
        return http.RequestInput(stream, length, None)


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


class JsonMethodNotAllowedMiddleware:
    """A 405 from Django, ninja or whitenoise (HTML or empty, with `Allow`) gets the JSON
    body every other refusal has; its `Allow` is kept."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.status_code != 405 or response.get("Content-Type", "").startswith(
            "application/json"
        ):
            return response
        allowed = [m.strip() for m in response.get("Allow", "").split(",") if m.strip()]
        return http.method_not_allowed(request.method, allowed)


class DatabaseUnavailableMiddleware:
    """A page or view whose query could not reach PostgreSQL (a restart, a failover)
    answers 503 with Retry-After, as the API does (portal/api.py), not a 500: the
    operator's browser, a proxy and a probe all know to come back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        logger.warning("database unavailable: %s", exception)
        if request.path.startswith("/api/") or "text/html" not in request.headers.get(
            "Accept", "text/html"
        ):
            response = JsonResponse(
                {"detail": "the database is unavailable; retry later"}, status=503
            )
        else:
            response = HttpResponse(
                "Runlens cannot reach its database right now. This page will work again "
                "once it is back; try again in a few seconds.",
                status=503,
                content_type="text/plain; charset=utf-8",
            )
        response["Retry-After"] = http.DATABASE_RETRY_AFTER_S
        return response


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
