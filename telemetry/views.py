"""Operator pages for errors: the grouped list and one group's detail with triage.

Everything shown here came from browsers and agents: templates escape it, and
none of it goes into hx-* attributes or links except our own ids and, for page
addresses, URLs already checked to be http(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.pages import ANY_TARGET, page
from telemetry.errors import parse_stack
from telemetry.models import ErrorGroup, ErrorReport

PAGE_SIZE = 50
STATUS_FILTERS = ["unresolved", "resolved", "ignored", "all"]


@dataclass
class Bar:
    x: int
    y: int
    height: int
    count: int
    hour: datetime


def histogram(counts: list[int], start: datetime, height: int = 24) -> list[Bar]:
    """Bars of an SVG sparkline (attributes, not inline styles: the CSP forbids those)."""
    peak = max(counts) or 1
    bars = []
    for i, n in enumerate(counts):
        h = max(1, round(n / peak * height)) if n else 0
        bars.append(Bar(x=i * 5, y=height - h, height=h, count=n, hour=start + timedelta(hours=i)))
    return bars


def _with_stats(groups: list[ErrorGroup]) -> list[ErrorGroup]:
    ids = [g.id for g in groups]
    affected = ErrorReport.objects.affected(ids)
    start, hourly = ErrorReport.objects.hourly(ids, timezone.now())
    for group in groups:
        group.affected = affected.get(group.id, {"users": 0, "urls": 0, "runs": 0})
        group.bars = histogram(hourly[group.id], start)
        group.last_day = sum(hourly[group.id])
    return groups


def _get_group(group_id: int) -> ErrorGroup:
    """The one fetch of a group for every view (operators see every project's errors)."""
    return get_object_or_404(ErrorGroup.objects.select_related("project"), pk=group_id)


@login_required
def errors_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "unresolved")
    if status not in STATUS_FILTERS:
        status = "unresolved"
    query = request.GET.get("q", "").strip()[:200]
    groups = ErrorGroup.objects.select_related("project").search(query)
    if status != "all":
        groups = groups.filter(status=status)
    shown = Paginator(groups.order_by("-last_seen", "-id"), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    context = {
        "page": shown,
        "groups": _with_stats(list(shown.object_list)),
        "status": status,
        "statuses": STATUS_FILTERS,
        "query": query,
    }
    # The filter form and the pager swap the groups only.
    return page(request, "telemetry/errors.html", context, {ANY_TARGET: "groups"})


@login_required
def error_detail(request: HttpRequest, group_id: int) -> HttpResponse:
    group = _with_stats([_get_group(group_id)])[0]
    reports = list(group.reports.select_related("run").order_by("-received_at", "-id")[:20])
    latest = reports[0] if reports else None
    context = {
        "group": group,
        "reports": reports,
        "latest": latest,
        "frames": parse_stack(latest.stack) if latest else [],
        "context_items": _context_items(latest.context) if latest else [],
    }
    return page(request, "telemetry/error_detail.html", context)


@login_required
@require_POST
def error_status(request: HttpRequest, group_id: int) -> HttpResponse:
    """Resolve, ignore or reopen. htmx swaps the status block; without JS, a redirect."""
    group = _get_group(group_id)
    status = request.POST.get("status", "")
    if status not in ErrorGroup.Status.values:
        return HttpResponseBadRequest("status must be unresolved, resolved or ignored")
    group.set_status(status)
    if request.htmx:
        context = {"group": group}
        return page(request, "telemetry/error_detail.html", context, {ANY_TARGET: "status"})
    return redirect("telemetry:error_detail", group_id=group.id)


def _context_items(context: dict) -> list[tuple[str, str, bool]]:
    """(key, text, is_structured) rows: nested values as indented JSON, shown as text."""
    items = []
    for key, value in sorted(context.items()):
        if isinstance(value, (dict, list)):
            items.append((key, orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), True))
        else:
            items.append((key, "" if value is None else str(value), False))
    return items
