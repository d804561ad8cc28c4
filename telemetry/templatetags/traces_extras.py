"""Links to traces from anywhere a trace id shows up (event rows, the stats table)."""

from __future__ import annotations

from django import template
from django.urls import reverse

from telemetry.traces import format_ms, normalize_trace_id

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


@register.filter
def ms(value) -> str:
    """A duration in milliseconds as text: 0.42 ms, 340 ms, 1.25 s."""
    return format_ms(value) if isinstance(value, int | float) else "—"
