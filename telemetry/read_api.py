"""Read API for error groups, their reports and traces (docs/errors.md, "Read API").

Token or operator, like the run endpoints: a project's ingest token sees its own
project only, a logged-in operator sees every project (`?project=<slug>` narrows).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from django.db.models import F
from django.http import Http404, HttpRequest
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError

from portal.api import DetailOut, read_auth
from runs.models import LEVELS, Project
from telemetry import traces
from telemetry.models import ErrorGroup, ErrorReport, Span

router = Router(tags=["errors and traces"])

MAX_TRACE_SPANS = 10_000  # one answer stays a few megabytes at most
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# Every read may answer these (portal/openapi.py adds them to every operation anyway).
ANSWERS: dict[int, Any] = {400: DetailOut, 401: DetailOut, 404: DetailOut}


# --- Keyset cursors ---------------------------------------------------------------
# Lists are ordered by a time, then id, so a cursor carries both: "<epoch µs>.<id>",
# digits only, safe in a URL as it is. PostgreSQL keeps microseconds, as Python does.


def encode_cursor(moment: datetime, pk: int) -> str:
    return f"{(moment - EPOCH) // timedelta(microseconds=1)}.{pk}"


def decode_cursor(cursor: str) -> tuple[datetime, int] | None:
    if not cursor:
        return None
    micros, _, pk = cursor.partition(".")
    if not (micros.lstrip("-").isdigit() and pk.isdigit() and len(cursor) <= 40):
        raise HttpError(400, "cursor: pass the next_cursor of the previous page as it is")
    try:
        return EPOCH + timedelta(microseconds=int(micros)), int(pk)
    except OverflowError:
        raise HttpError(400, "cursor: out of range") from None


def page_of(rows: list, limit: int, key) -> tuple[list, str | None]:
    """The page and the cursor of the next one: `limit + 1` rows were asked for."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(*key(rows[-1])) if more else None


# --- Who sees what ----------------------------------------------------------------


def groups_for(request: HttpRequest, project: str = ""):
    """The groups the caller may see: its project's with a token, all for an operator."""
    if isinstance(request.auth, Project):
        return ErrorGroup.objects.filter(project=request.auth)
    groups = ErrorGroup.objects.all()
    return groups.filter(project__slug=project) if project else groups


def group_for(request: HttpRequest, group_id: int) -> ErrorGroup:
    group = groups_for(request).filter(pk=group_id).first()
    if group is None:
        raise Http404("error group not found")
    return group


# --- Shapes -----------------------------------------------------------------------


GROUP_FIELDS = ("id", "title", "culprit", "level", "status", "count", "first_seen", "last_seen")


def group_json(group: ErrorGroup) -> dict:
    return {**{name: getattr(group, name) for name in GROUP_FIELDS}, "source": group.source}


def report_json(report: ErrorReport) -> dict:
    """A report as stored: a Sentry event whole, as the receiver kept it; a beacon or an
    agent's error event from its columns. Then the report's own columns, which win over
    any key of the same name in a (client-written) Sentry event."""
    if report.source == ErrorReport.Source.SENTRY and report.event:
        out = dict(report.event)
    else:
        out = {
            "source": report.source,
            "level": report.level,
            "message": report.message,
            "error": report.error,
            "stack": report.stack,
            "context": report.context,
            "url": report.url,
            "request_id": report.request_id,
        }
    out.update(
        id=report.id,
        event_id=report.event_id,
        received_at=report.received_at,
        release=report.release,
        environment=report.environment,
        run_id=report.client_run_id,
    )
    return out


class ErrorGroupOut(Schema):
    id: int
    title: str
    culprit: str
    level: str
    status: str
    count: int
    first_seen: datetime
    last_seen: datetime
    source: str


class ErrorGroupPage(Schema):
    items: list[ErrorGroupOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class ErrorGroupDetailOut(ErrorGroupOut):
    latest: dict[str, Any] | None = Field(
        description="the newest report, shaped as an item of /events; null when none is kept"
    )


class ErrorReportPage(Schema):
    items: list[dict[str, Any]] = Field(
        description="reports newest first: a Sentry event as stored, or a beacon's or agent "
        "event's fields, plus id, event_id, received_at, release, environment, run_id"
    )
    next_cursor: str | None


class SpanOut(Schema):
    span_id: str
    parent_span_id: str
    name: str
    kind: int = Field(description="OTLP SpanKind: 0 unspecified … 5 consumer")
    service: str
    start_time: datetime
    end_time: datetime
    duration_ms: float
    status_code: int = Field(description="OTLP status: 0 unset, 1 ok, 2 error")
    status_message: str
    attributes: dict[str, Any]
    events: list[Any]
    run_id: str | None


class TraceOut(Schema):
    trace_id: str
    spans: list[SpanOut]
    truncated: bool = Field(description=f"the trace has more than {MAX_TRACE_SPANS} spans")


# --- Errors -----------------------------------------------------------------------


class ErrorFilters(Schema):
    query: str = Field("", max_length=200, description="search in title and culprit")
    status: ErrorGroup.Status | None = None
    level: Literal[LEVELS] | None = None  # type: ignore[valid-type]
    source: ErrorReport.Source | None = None
    release: str = Field("", max_length=200, description="groups with a report of this release")
    environment: str = Field("", max_length=64, description="… of this environment")
    run_id: str = Field("", max_length=128, description="… of this run (its own run id)")
    project: str = Field("", description="project slug (operators only)")
    cursor: str = Field("", description="next_cursor of the previous page")
    limit: int = Field(50, ge=1, le=1000)


@router.get(
    "/errors",
    auth=read_auth,
    response={200: ErrorGroupPage, 400: ANSWERS[400], 401: DetailOut},
    summary="List error groups, last seen first",
)
def list_errors(request: HttpRequest, filters: Query[ErrorFilters]):
    after = decode_cursor(filters.cursor)
    groups = groups_for(request, filters.project).search(filters.query)
    for name in ("status", "level", "source"):
        if value := getattr(filters, name):
            groups = groups.filter(**{name: value})
    reports = {"release": filters.release, "environment": filters.environment}
    reports["run__run_id"] = filters.run_id
    groups = groups.with_reports(**{name: value for name, value in reports.items() if value})
    rows = list(groups.newest_seen_first(after)[: filters.limit + 1])
    page, cursor = page_of(rows, filters.limit, lambda g: (g.last_seen, g.id))
    return {"items": [group_json(group) for group in page], "next_cursor": cursor}


@router.get(
    "/errors/{group_id}",
    auth=read_auth,
    response={200: ErrorGroupDetailOut, **ANSWERS},
    summary="One error group with its latest report",
)
def error_detail(request: HttpRequest, group_id: int):
    group = group_for(request, group_id)
    latest = ErrorReport.objects.filter(group=group).newest_first().first()
    return {**group_json(group), "latest": report_json(latest) if latest else None}


class PageFilters(Schema):
    cursor: str = Field("", description="next_cursor of the previous page")
    limit: int = Field(50, ge=1, le=1000)


@router.get(
    "/errors/{group_id}/events",
    auth=read_auth,
    response={200: ErrorReportPage, **ANSWERS},
    summary="An error group's reports, newest first",
)
def error_events(request: HttpRequest, group_id: int, filters: Query[PageFilters]):
    after = decode_cursor(filters.cursor)
    group = group_for(request, group_id)
    reports = ErrorReport.objects.filter(group=group).newest_first(after)
    rows = list(reports[: filters.limit + 1])
    page, cursor = page_of(rows, filters.limit, lambda r: (r.received_at, r.id))
    return {"items": [report_json(report) for report in page], "next_cursor": cursor}


# --- Traces -----------------------------------------------------------------------

SPAN_FIELDS = (
    "span_id",
    "parent_span_id",
    "name",
    "kind",
    "service",
    "start_time",
    "end_time",
    "duration_ms",
    "status_code",
    "status_message",
    "attributes",
    "events",
)


@router.get(
    "/traces/{trace_id}",
    auth=read_auth,
    response={200: TraceOut, **ANSWERS},
    summary="Every span of a trace, by start time",
)
def trace_detail(request: HttpRequest, trace_id: str, project: str = ""):
    """A trace id is 32 hex digits; upper case and the UUID form are read as the pages
    read them (docs/traces.md). An operator sees the spans of every project that used
    the id, unless `?project=` names one."""
    normal = traces.normalize_trace_id(trace_id)
    if normal is None:
        raise HttpError(400, "trace_id: 32 hex digits")
    if isinstance(request.auth, Project):
        spans = Span.objects.filter(project=request.auth, trace_id=normal)
    else:
        spans = traces.trace_spans(normal, project)
    rows = list(
        spans.annotate(client_run_id=F("run__run_id"))
        .order_by("start_time", "span_id")
        .values(*SPAN_FIELDS, "client_run_id")[: MAX_TRACE_SPANS + 1]
    )
    if not rows:
        raise Http404("trace not found")
    for row in rows:
        row["run_id"] = row.pop("client_run_id")
        # Stored as the exporter sent them: keep the documented shapes whatever came.
        if not isinstance(row["attributes"], dict):
            row["attributes"] = {}
        if not isinstance(row["events"], list):
            row["events"] = []
    return {
        "trace_id": normal,
        "spans": rows[:MAX_TRACE_SPANS],
        "truncated": len(rows) > MAX_TRACE_SPANS,
    }
