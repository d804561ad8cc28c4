"""Metrics read endpoints: aggregate and export. (Recording is an ingest receiver:
telemetry/receivers/metrics.py, routed in telemetry/api.py.)"""

from __future__ import annotations

from django.http import HttpRequest, StreamingHttpResponse
from django.utils.text import slugify
from ninja import Field, Query, Router, Schema, Status

from portal.api import DetailOut, read_auth
from runs import analytics
from runs.models import Project, RunMetric

router = Router(tags=["metrics"])


def metrics_for(request: HttpRequest, project: str = ""):
    """The metrics the caller may see: its project's with a token, all for an operator
    (narrowed to one project by its slug if asked)."""
    if isinstance(request.auth, Project):
        return RunMetric.objects.filter(project=request.auth)
    if project:
        return RunMetric.objects.filter(project__slug=project)
    return RunMetric.objects.all()


class AggregateQuery(Schema):
    metricName: str = Field(..., min_length=1, max_length=200)  # noqa: N815 (the API's name)
    aggregation: str = Field(
        "avg",
        description="sum, avg, min, max, count, stddev, p50, p95, p99",
        json_schema_extra={"enum": list(analytics.AGGREGATIONS)},
    )
    groupBy: str = Field(  # noqa: N815
        "", description="slug, day or model", json_schema_extra={"enum": ["", *analytics.GROUPS]}
    )
    slug: str = Field("", max_length=200, description="only runs of this slug")
    project: str = Field("", max_length=100, description="project slug (operators only)")
    since: str = Field("", description="ISO 8601 or epoch seconds, inclusive")
    until: str = Field("", description="ISO 8601 or epoch seconds, exclusive")


@router.get(
    "/analytics/metrics",
    auth=read_auth,
    response={200: dict | list[dict], 400: DetailOut},
    summary="Aggregate one metric, optionally per slug, day or model",
)
def aggregate_metrics(request: HttpRequest, q: Query[AggregateQuery]):
    """`{metric, aggregation, value, count, min, max}`; with `groupBy`, one such object
    per group with a `group` key. Computed in PostgreSQL; `value` is null when no
    point matches (and for stddev of a single point)."""
    try:
        _text_params(metricName=q.metricName, slug=q.slug, project=q.project)
        window = analytics.Window.parse(q.since, q.until)
        points = analytics.points(metrics_for(request, q.project), q.metricName, q.slug, window)
        return analytics.aggregate(points, q.metricName, q.aggregation, q.groupBy or None)
    except analytics.QueryError as exc:
        return Status(400, {"detail": str(exc)})


def _text_params(**params: str) -> None:
    # PostgreSQL refuses NUL in text: a parameter holding one matches nothing, say so.
    for name, value in params.items():
        if "\x00" in value:
            raise analytics.QueryError(f"{name}: must not contain NUL characters")


class ExportQuery(Schema):
    metricName: str = Field("", max_length=200, description="empty: every metric")  # noqa: N815
    format: str = Field(
        "csv",
        description="csv or jsonl",
        json_schema_extra={"enum": list(analytics.EXPORT_FORMATS)},
    )
    limit: int | None = Field(None, ge=1, le=10**12, description="at most this many points")
    since: str = Field("", description="ISO 8601 or epoch seconds, inclusive")
    until: str = Field("", description="ISO 8601 or epoch seconds, exclusive")
    slug: str = Field("", max_length=200)
    project: str = Field("", max_length=100, description="project slug (operators only)")
    order: str = Field(
        "asc",
        description="asc (oldest first) or desc (newest first)",
        json_schema_extra={"enum": ["asc", "desc"]},
    )


@router.get(
    "/analytics/export",
    auth=read_auth,
    response={200: None, 400: DetailOut},
    summary="Export metric points as CSV or JSON lines, streamed",
)
def export_metrics(request: HttpRequest, q: Query[ExportQuery]):
    """CSV (`id,run_id,metric_name,metric_value,recorded_at`, RFC 4180, formula-like
    text neutralised with a leading `'`) or JSON lines, ordered by `recorded_at`.
    Rows are read with a server-side cursor and streamed, never held in memory."""
    if q.format not in analytics.EXPORT_FORMATS:
        return Status(400, {"detail": "format: must be csv or jsonl"})
    if q.order not in ("asc", "desc"):
        return Status(400, {"detail": "order: must be asc or desc"})
    try:
        _text_params(metricName=q.metricName, slug=q.slug, project=q.project)
        window = analytics.Window.parse(q.since, q.until)
    except analytics.QueryError as exc:
        return Status(400, {"detail": str(exc)})
    points = analytics.points(metrics_for(request, q.project), q.metricName, q.slug, window)
    content_type, lines = analytics.EXPORT_FORMATS[q.format]
    response = StreamingHttpResponse(
        lines(analytics.export_rows(points, q.limit, newest_first=q.order == "desc")),
        content_type=content_type,
    )
    # The file name comes from the slugified name: agent text cannot break the header.
    stem = slugify(q.metricName)[:60] or "all"
    response["Content-Disposition"] = f'attachment; filename="metrics-{stem}.{q.format}"'
    return response
