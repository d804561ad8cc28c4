"""Operator pages for errors: the grouped list and one group's detail with triage.

Everything shown here came from browsers and agents: templates escape it, and
none of it goes into hx-* attributes or links except our own ids and, for page
addresses, URLs already checked to be http(s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.http import allow_methods
from portal.pages import ANY_TARGET, page
from runs.models import Project
from telemetry.errors import parse_stack
from telemetry.models import ErrorGroup, ErrorReport

PAGE_SIZE = 50
RECENT_REPORTS = 20
BREAKDOWN_ROWS = 10  # releases and environments shown per group
MAX_BREADCRUMBS = 200  # what a page shows of one event's trail (SDKs keep 100 by default)
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


@allow_methods("GET")
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


@allow_methods("GET")
@login_required
def error_detail(request: HttpRequest, group_id: int) -> HttpResponse:
    group = _with_stats([_get_group(group_id)])[0]
    reports = list(
        group.reports.select_related("run").order_by("-received_at", "-id")[:RECENT_REPORTS]
    )
    if group.source == ErrorReport.Source.SENTRY:
        return _sentry_detail(request, group, reports)
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
        return page(request, "telemetry/_group_head.html", context, {ANY_TARGET: "status"})
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


# --- Sentry events: the group page shows the stored event itself ----------------------
#
# `ErrorReport.event` is Sentry's JSON made canonical by the receiver (the shapes are in
# docs/errors.md), but every value in it came from a client: the helpers below read it
# defensively (a list where a dict belongs, a number where text belongs never breaks the
# page) and hand the template plain strings, which it escapes.


@dataclass
class SourceLine:
    number: int | None
    text: str
    current: bool = False


@dataclass
class FrameView:
    file: str
    function: str
    line: int | None
    column: int | None
    in_app: bool
    module: str = ""
    source: list[SourceLine] = field(default_factory=list)
    variables: list[tuple[str, str, bool]] = field(default_factory=list)

    @property
    def where(self) -> str:
        """`file:line:column`, Sentry's way of naming a frame's place."""
        place = self.file or self.module or "?"
        if self.line is not None:
            place += f":{self.line}"
            if self.column is not None:
                place += f":{self.column}"
        return place

    @property
    def has_details(self) -> bool:
        return bool(self.source or self.variables)


@dataclass
class ExceptionView:
    type: str
    value: str
    module: str
    mechanism: str
    handled: str  # "yes", "no" or "" (not said)
    frames: list[FrameView]  # the crashing frame first, as Sentry shows them

    @property
    def app_frames(self) -> list[FrameView]:
        return [f for f in self.frames if f.in_app]

    @property
    def split(self) -> bool:
        """In-app frames up front and the whole stack behind a toggle: only when the
        stack mixes both kinds (all-library or all-app stacks are shown whole)."""
        return 0 < len(self.app_frames) < len(self.frames)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    """A scalar as text; structures as compact JSON (never their Python repr)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, default=str).decode()
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _pairs(value: Any) -> list[tuple[str, str, bool]]:
    """Rows of a mapping sent as a dict or as `[[key, value], …]` (Sentry allows both
    for headers, tags and query strings)."""
    if isinstance(value, list):
        value = {
            _text(pair[0]): pair[1]
            for pair in value
            if isinstance(pair, (list, tuple)) and len(pair) == 2
        }
    return _context_items(_dict(value))


def _frame(raw: dict) -> FrameView:
    line = _int(raw.get("lineno"))
    source: list[SourceLine] = []
    before = [_text(t) for t in _list(raw.get("pre_context"))]
    after = [_text(t) for t in _list(raw.get("post_context"))]
    if "context_line" in raw:
        start = line - len(before) if line is not None else None

        def number(i: int) -> int | None:
            return None if start is None else start + i

        source = [SourceLine(number(i), t) for i, t in enumerate(before)]
        source.append(SourceLine(line, _text(raw.get("context_line")), current=True))
        source += [SourceLine(number(len(before) + 1 + i), t) for i, t in enumerate(after)]
    return FrameView(
        file=_text(raw.get("filename") or raw.get("abs_path")),
        function=_text(raw.get("function")) or "?",
        line=line,
        column=_int(raw.get("colno")),
        # As in Sentry: a frame is the application's only when the SDK says so (the
        # Python SDK leaves frozen and stdlib frames unset).
        in_app=raw.get("in_app") is True,
        module=_text(raw.get("module")),
        source=source,
        variables=_pairs(raw.get("vars")),
    )


def exception_chain(event: dict) -> list[ExceptionView]:
    """The exceptions of an event, newest (the one raised last) first, each with its
    frames crashing-frame first. Sentry sends both in the other order."""
    chain = []
    for raw in reversed(_list(_dict(event.get("exception")).get("values"))):
        raw = _dict(raw)
        mechanism = _dict(raw.get("mechanism"))
        handled = mechanism.get("handled")
        frames = [_frame(_dict(f)) for f in _list(_dict(raw.get("stacktrace")).get("frames"))]
        chain.append(
            ExceptionView(
                type=_text(raw.get("type")),
                value=_text(raw.get("value")),
                module=_text(raw.get("module")),
                mechanism=_text(mechanism.get("type")),
                handled="" if handled is None else ("yes" if handled else "no"),
                frames=frames[::-1],
            )
        )
    return chain


def _when(value: Any) -> str:
    """A Sentry timestamp (ISO text or epoch seconds) as UTC text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        except (OverflowError, OSError, ValueError):
            return str(value)
    return _text(value)


def _breadcrumbs(event: dict) -> list[dict[str, str]]:
    crumbs = event.get("breadcrumbs")
    values = _list(_dict(crumbs).get("values")) or _list(crumbs)
    rows = []
    for crumb in values[-MAX_BREADCRUMBS:]:
        crumb = _dict(crumb)
        data = crumb.get("data")
        rows.append(
            {
                "time": _when(crumb.get("timestamp")),
                "category": _text(crumb.get("category")),
                "type": _text(crumb.get("type")),
                "level": _text(crumb.get("level")),
                "message": _text(crumb.get("message")),
                "data": orjson.dumps(data, default=str).decode() if data else "",
            }
        )
    return rows


def _query_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "&".join(f"{key}={text}" for key, text, _ in _pairs(value))


def _message(event: dict) -> str:
    logentry = _dict(event.get("logentry"))
    return _text(logentry.get("formatted") or logentry.get("message") or event.get("message"))


def sentry_event_context(event: dict) -> dict:
    """What the template shows of one stored Sentry event: all of it plain text."""
    event = _dict(event)
    request = _dict(event.get("request"))
    contexts = _dict(event.get("contexts"))
    sdk = _dict(event.get("sdk"))
    return {
        "chain": exception_chain(event),
        "message": _message(event),
        "facts": [
            (label, _text(event.get(key)))
            for label, key in (
                ("Event id", "event_id"),
                ("Timestamp", "timestamp"),
                ("Platform", "platform"),
                ("Logger", "logger"),
                ("Transaction", "transaction"),
                ("Server", "server_name"),
                ("Fingerprint", "fingerprint"),
            )
            if event.get(key) not in (None, "", [], {})
        ],
        "tags": _pairs(event.get("tags")),
        "event_user": _pairs(event.get("user")),
        "breadcrumbs": _breadcrumbs(event),
        "event_request": {
            "method": _text(request.get("method")),
            "url": _text(request.get("url")),
            "query": _query_string(request.get("query_string")),
            "headers": _pairs(request.get("headers")),
            "data": _text(request.get("data")),
            "cookies": _text(request.get("cookies")),
            "env": _pairs(request.get("env")),
        }
        if request
        else None,
        "contexts": [(_text(name), _pairs(values)) for name, values in sorted(contexts.items())],
        "trace_id": _text(_dict(contexts.get("trace")).get("trace_id")),
        "extra": _pairs(event.get("extra")),
        "sdk": f"{_text(sdk.get('name'))} {_text(sdk.get('version'))}".strip(),
        "sdk_rows": _pairs({k: v for k, v in sdk.items() if k not in ("name", "version")}),
    }


def _neighbours(group: ErrorGroup, report: ErrorReport) -> tuple[int | None, int | None]:
    """The ids of the next newer and next older reports of the group (two index reads:
    reports are ordered by `received_at`, ties by id, like the occurrences table)."""
    at, pk = report.received_at, report.pk
    newer = (
        group.reports.filter(Q(received_at__gt=at) | Q(received_at=at, pk__gt=pk))
        .order_by("received_at", "id")
        .values_list("id", flat=True)
        .first()
    )
    older = (
        group.reports.filter(Q(received_at__lt=at) | Q(received_at=at, pk__lt=pk))
        .order_by("-received_at", "-id")
        .values_list("id", flat=True)
        .first()
    )
    return newer, older


def _breakdown(group: ErrorGroup, field_name: str) -> list[dict]:
    """Kept reports per value of `field_name`, most first: one GROUP BY."""
    rows = (
        group.reports.values(field_name)
        .annotate(n=Count("id"))
        .order_by("-n", field_name)[:BREAKDOWN_ROWS]
    )
    return [{"value": row[field_name], "n": row["n"]} for row in rows]


def _sentry_detail(
    request: HttpRequest, group: ErrorGroup, reports: list[ErrorReport]
) -> HttpResponse:
    """The group page of Sentry events: one event at a time (`?event=<report id>`,
    the newest by default), stepped through with plain links."""
    shown = reports[0] if reports else None
    missing = False
    wanted = request.GET.get("event", "")
    if wanted and shown is not None and str(shown.pk) != wanted:
        found = None
        if wanted.isdigit():
            found = next((r for r in reports if r.pk == int(wanted)), None)
            if found is None:
                found = group.reports.select_related("run").filter(pk=int(wanted)).first()
        # An event retention removed (an old link): say so and show the newest.
        missing = found is None
        shown = found or shown
    context: dict = {
        "group": group,
        "reports": reports,
        "latest": shown,
        "missing_event": missing,
    }
    if shown is not None:
        newer, older = _neighbours(group, shown)
        context.update(
            sentry_event_context(shown.event),
            newer=newer,
            older=older,
            is_newest=newer is None,
            releases=_breakdown(group, "release"),
            environments=_breakdown(group, "environment"),
        )
    return page(request, "telemetry/sentry_detail.html", context)


# --- DSN set-up --------------------------------------------------------------------------


@allow_methods("GET")
@login_required
def projects(request: HttpRequest) -> HttpResponse:
    """Each project's Sentry DSN with set-up snippets: point an SDK's DSN here and its
    errors land in /errors (docs/pages.md)."""
    context = {
        "projects": list(Project.objects.order_by("name", "id")),
        "runlens_url": settings.RUNLENS_URL,
    }
    return page(request, "telemetry/projects.html", context)
