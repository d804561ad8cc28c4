"""Request ids: taken from X-Request-ID when sane, else a new UUIDv7; echoed back."""

from __future__ import annotations

import re

from django.conf import settings

from portal.logging import request_id_var
from runs.ids import uuid7

_SANE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _SANE.match(incoming) else str(uuid7())
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response["X-Request-ID"] = request_id
        return response


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
