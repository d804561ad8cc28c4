"""Links to traces from anywhere a trace id shows up (event rows, the stats table)."""

from __future__ import annotations

from django import template
from django.urls import reverse

from telemetry.traces import normalize_trace_id

register = template.Library()


@register.filter
def trace_url(trace_id) -> str:
    """The waterfall's address for a trace id, or "" when the value is not a trace id.

    Events carry whatever their agent sent as `trace_id`: only 32 hex digits (or a
    UUID) become a link, so agent text never shapes a URL.
    """
    if not isinstance(trace_id, str):
        return ""
    normalized = normalize_trace_id(trace_id)
    return reverse("telemetry:trace", args=[normalized]) if normalized else ""
