"""Questions asked of run metrics: aggregates computed in PostgreSQL, streamed exports.

Every function takes a RunMetric queryset already narrowed to what the caller
may see (see runs.metrics_api.metrics_for), so scoping lives in one place.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from django.db.models import (
    Aggregate,
    Avg,
    Count,
    F,
    FloatField,
    Max,
    Min,
    QuerySet,
    StdDev,
    Sum,
)
from django.db.models.fields.json import KT
from django.db.models.functions import TruncDate

from runs.ingest import LineError, _parse_ts

MAX_GROUPS = 1000
EXPORT_CHUNK = 2000  # rows per fetch from the server-side cursor, and per yielded chunk


class QueryError(ValueError):
    """A bad read parameter: the message names it (the API answers 400)."""


@dataclass(frozen=True)
class Window:
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, since: str = "", until: str = "") -> Window:
        """`since` (inclusive) and `until` (exclusive): ISO 8601 or epoch seconds, as events."""
        return cls(_when("since", since), _when("until", until))


def _when(name: str, text: str) -> datetime | None:
    if not text:
        return None
    value: str | float
    try:
        value = float(text)  # epoch seconds (or milliseconds)
    except ValueError:
        value = text
    try:
        return _parse_ts(value)
    except LineError as exc:
        raise QueryError(str(exc).replace("ts:", f"{name}:", 1)) from None


def points(metrics: QuerySet, name: str = "", slug: str = "", window: Window = Window()):
    """The points of one metric (all metrics if `name` is empty), of a slug, in a window."""
    if name:
        metrics = metrics.filter(name=name)
    if slug:
        metrics = metrics.filter(run__slug=slug)
    if window.since:
        metrics = metrics.filter(recorded_at__gte=window.since)
    if window.until:
        metrics = metrics.filter(recorded_at__lt=window.until)
    return metrics


# --- Aggregates -----------------------------------------------------------------


class Percentile(Aggregate):
    """PostgreSQL's continuous percentile: interpolates between the two nearest points."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        # A constant from AGGREGATIONS below, never request text.
        super().__init__(expression, fraction=float(fraction), **extra)


AGGREGATIONS: dict[str, Callable[[], Aggregate]] = {
    "sum": lambda: Sum("value"),
    "avg": lambda: Avg("value"),
    "min": lambda: Min("value"),
    "max": lambda: Max("value"),
    "count": lambda: Count("id"),
    "stddev": lambda: StdDev("value", sample=True),
    "p50": lambda: Percentile("value", 0.5),
    "p95": lambda: Percentile("value", 0.95),
    "p99": lambda: Percentile("value", 0.99),
}

GROUPS = {
    "slug": lambda: F("run__slug"),
    "day": lambda: TruncDate("recorded_at", tzinfo=UTC),
    "model": lambda: KT("labels__model"),
}


def aggregate(points: QuerySet, metric: str, aggregation: str, group_by: str | None = None):
    """One aggregate of the points, or one per group (at most MAX_GROUPS, in group order).

    `value` is the aggregation; `count`, `min` and `max` come with it, all from one
    query. `value` is null when nothing matches, and for stddev of a single point
    (the sample standard deviation needs two).
    """
    if aggregation not in AGGREGATIONS:
        raise QueryError(f"aggregation: must be one of {', '.join(AGGREGATIONS)}")
    if group_by is not None and group_by not in GROUPS:
        raise QueryError(f"groupBy: must be one of {', '.join(GROUPS)}")
    stats = {
        "agg_value": AGGREGATIONS[aggregation](),
        "agg_count": Count("id"),
        "agg_min": Min("value"),
        "agg_max": Max("value"),
    }
    head = {"metric": metric, "aggregation": aggregation}
    if group_by is None:
        return {**head, **_stats(points.aggregate(**stats))}
    rows = (
        points.annotate(group=GROUPS[group_by]())
        .values("group")
        .annotate(**stats)
        .order_by(F("group").asc(nulls_last=True))[:MAX_GROUPS]
    )
    return [{"group": _group(row["group"]), **head, **_stats(row)} for row in rows]


def _stats(row: dict) -> dict:
    return {
        "value": row["agg_value"],
        "count": row["agg_count"],
        "min": row["agg_min"],
        "max": row["agg_max"],
    }


def _group(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


# --- Export -----------------------------------------------------------------------

CSV_HEADER = ("id", "run_id", "metric_name", "metric_value", "recorded_at")
# A cell starting with one of these is a formula to a spreadsheet.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """Agent text made inert in a spreadsheet: a leading `'` before a formula character."""
    return "'" + text if text.startswith(FORMULA_START) else text


def number(value: float) -> str:
    """5432.0 -> "5432", 0.1 -> "0.1": what the agent most likely sent."""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def export_rows(points: QuerySet, limit: int | None = None, newest_first: bool = False):
    """The points in time order (newest first if asked), up to `limit`, as a queryset that
    the exporters read with a server-side cursor (`.iterator(chunk_size=…)`)."""
    order = ("-recorded_at", "-id") if newest_first else ("recorded_at", "id")
    rows = points.order_by(*order)
    return rows[:limit] if limit else rows


class _Echo:
    """A file for csv.writer that hands each formatted line back instead of storing it."""

    def write(self, line: str) -> str:
        return line


def csv_lines(rows: QuerySet) -> Iterator[bytes]:
    """RFC 4180 CSV (csv module quoting, CRLF), header first, in chunks of EXPORT_CHUNK rows.

    Numbers and times are formatted here and cannot hold a formula; the run id and
    metric name are agent text and are neutralised.
    """
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_HEADER).encode()
    chunk: list[str] = []
    columns = rows.values_list("id", "run__run_id", "name", "value", "recorded_at")
    for pk, run_id, name, value, at in columns.iterator(chunk_size=EXPORT_CHUNK):
        chunk.append(
            writer.writerow(
                (pk, neutralise(run_id or ""), neutralise(name), number(value), timestamp(at))
            )
        )
        if len(chunk) >= EXPORT_CHUNK:
            yield "".join(chunk).encode()
            chunk = []
    if chunk:
        yield "".join(chunk).encode()


def jsonl_lines(rows: QuerySet) -> Iterator[bytes]:
    """One JSON object per line: the CSV's fields plus `unit` and `labels`."""
    chunk: list[bytes] = []
    columns = rows.values_list(
        "id", "run__run_id", "name", "value", "recorded_at", "unit", "labels"
    )
    for pk, run_id, name, value, at, unit, labels in columns.iterator(chunk_size=EXPORT_CHUNK):
        chunk.append(
            orjson.dumps(
                {
                    "id": pk,
                    "run_id": run_id,
                    "metric_name": name,
                    "metric_value": value,
                    "recorded_at": timestamp(at),
                    "unit": unit,
                    "labels": labels,
                }
            )
        )
        if len(chunk) >= EXPORT_CHUNK:
            yield b"\n".join(chunk) + b"\n"
            chunk = []
    if chunk:
        yield b"\n".join(chunk) + b"\n"


EXPORT_FORMATS = {
    "csv": ("text/csv; charset=utf-8", csv_lines),
    "jsonl": ("application/x-ndjson", jsonl_lines),
}
