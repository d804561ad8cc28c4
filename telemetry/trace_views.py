"""Operator pages for traces: one trace's waterfall, one span's details, per-name stats.

Span names, attributes, resources and events come from agents: the templates only
escape them. The only values placed in URLs are ids checked to be hex (trace and
span ids) and project slugs.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse

from portal.http import allow_methods
from portal.pages import ANY_TARGET, page
from telemetry import traces


def _trace_id(value: str) -> str:
    trace_id = traces.normalize_trace_id(value)
    if trace_id is None:
        raise Http404("No such trace.")
    return trace_id


@allow_methods("GET")
@login_required
def trace_detail(request: HttpRequest, trace_id: str) -> HttpResponse:
    trace_id = _trace_id(trace_id)
    project = request.GET.get("project", "")[:100].replace("\x00", "")
    trace = traces.load_trace(trace_id, project)
    if trace is None:
        raise Http404("No such trace.")
    return page(request, "telemetry/trace.html", {"trace": trace, "selected": None})


@allow_methods("GET")
@login_required
def span_detail(request: HttpRequest, trace_id: str, span_id: str) -> HttpResponse:
    """One span's attributes, resource and events: the fragment a waterfall row loads
    when opened, or (without JavaScript) the waterfall with that row open."""
    trace_id = _trace_id(trace_id)
    project = request.GET.get("project", "")[:100].replace("\x00", "")
    span = traces.load_span(trace_id, span_id.lower(), project)
    if span is None:
        raise Http404("No such span.")
    context = {"span": span, "events": traces.span_events(span), "selected": span}
    if request.htmx and not request.htmx.history_restore_request:
        # Opening a row loads its details only (target `find .span-detail`: no id).
        return page(request, "telemetry/trace.html", context, {ANY_TARGET: "span-detail"})
    trace = traces.load_trace(trace_id, span.project.slug)
    # A span past the waterfall's cap is shown above it instead of in its row.
    shown = any(node.span.pk == span.pk for node in trace.rows) if trace else False
    context.update(trace=trace, selected_shown=shown)
    return page(request, "telemetry/trace.html", context)


@allow_methods("GET")
@login_required
def span_stats(request: HttpRequest) -> HttpResponse:
    window = request.GET.get("window", "24h")
    if window not in traces.WINDOWS:
        window = "24h"
    order = request.GET.get("order", "p95")
    if order not in traces.STATS_ORDERS:
        order = "p95"
    # PostgreSQL text cannot hold NUL: such a service matches nothing anyway.
    service = request.GET.get("service", "")[:200].replace("\x00", "")
    context = {
        "rows": traces.span_stats(window, service, order),
        "services": traces.services_in_window(window),
        "window": window,
        "windows": list(traces.WINDOWS),
        "order": order,
        "service": service,
        "limit": traces.STATS_LIMIT,
    }
    return page(request, "telemetry/spans.html", context)
