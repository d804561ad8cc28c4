"""Questions asked of run metrics: aggregates computed in PostgreSQL, streamed exports.

Every function takes a RunMetric queryset already narrowed to what the caller
may see (see runs.metrics_api.metrics_for), so scoping lives in one place.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from django.conf import settings
from django.db import connections, transaction
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.db.models.fields.json import KT
from django.db.models.functions import TruncDate

from portal.db import read_alias
from runs.models import Run
from runs.timestamps import TimestampError, parse_timestamp

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
        return parse_timestamp(value, name)
    except TimestampError as exc:
        raise QueryError(str(exc)) from None


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
#
# Not every stored point is an independent value (docs/metrics.md, "What a point
# counts for"):
#
# * an OTLP point labelled `otel.temporality: cumulative` is a running total since its
#   series started, so only the newest point of each series in the selection counts
#   (a series: project, run, name and labels; the labels carry the temporality);
# * an OTLP histogram point summarises many observations: a group whose points are
#   histograms is answered from their merged buckets, sums and counts.
#
# Both rules are applied in PostgreSQL: the points that count are the non-cumulative
# ones plus, from DISTINCT ON, the newest cumulative point of each series; one query
# aggregates them, merging bucket counts per bounds set when a percentile is asked.
# Python only interpolates inside the few merged buckets.

# The cheap test first: most points were not sent over OTLP.
_CUMULATIVE = Q(source="otlp") & Q(labels__contains={"otel.temporality": "cumulative"})
_SERIES = ("project_id", "run_id", "name", "labels")

# SQL over the column `value` of the points that count (constants, never request text).
AGGREGATIONS: dict[str, str] = {
    "sum": "sum(value)",
    "avg": "avg(value)",
    "min": "min(value)",
    "max": "max(value)",
    "count": "count(*)",
    "stddev": "stddev_samp(value)",
    # Continuous percentile: interpolates between the two nearest points.
    "p50": "percentile_cont(0.5) WITHIN GROUP (ORDER BY value)",
    "p95": "percentile_cont(0.95) WITHIN GROUP (ORDER BY value)",
    "p99": "percentile_cont(0.99) WITHIN GROUP (ORDER BY value)",
}
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


def _run_slug() -> Subquery:
    # The slug of each point's run, looked up by primary key: the cost follows the points
    # in the window. A join let PostgreSQL hash the whole runs table instead, and a day's
    # aggregate at 30 days of history took 4x what it took at 3 (docs/scaling.md).
    return Subquery(Run.objects.filter(pk=OuterRef("run_id")).values("slug")[:1])


GROUPS = {
    "slug": _run_slug,
    "day": lambda: TruncDate("recorded_at", tzinfo=UTC),
    "model": lambda: KT("labels__model"),
}

# The aggregation runs over every point that counts: a group without histogram points
# is answered by it, a group with some by the histogram figures alone (so no FILTER is
# needed on the hot path of plain metrics).
_STATS = """
    {agg} AS value, count(*) AS n, min(value) AS lo, max(value) AS hi,
    count(histogram) AS h_points,
    sum((histogram->>'count')::float8) AS h_count,
    sum((histogram->>'sum')::float8) AS h_sum, count(histogram->>'sum') AS h_sums,
    min((histogram->>'min')::float8) AS h_min, count(histogram->>'min') AS h_mins,
    max((histogram->>'max')::float8) AS h_max, count(histogram->>'max') AS h_maxes
"""
# Bucket counts summed per bucket index, per group and distinct bounds array; then one
# [bounds, counts, points] triple per bounds array, gathered per group. The bounds are
# compared as text, which sorts far faster than jsonb (the stored form is Runlens' own,
# so equal bounds have equal text).
_SETS = """
sets AS (
    SELECT {grp} bounds, jsonb_agg(n ORDER BY ord) AS counts, max(points) AS points
    FROM (
        SELECT {grp} (histogram->'bounds')::text AS bounds, c.ord, sum(c.n::float8) AS n,
               count(*) AS points
        FROM eff CROSS JOIN LATERAL
             jsonb_array_elements_text(histogram->'counts') WITH ORDINALITY AS c(n, ord)
        WHERE histogram IS NOT NULL
        GROUP BY {grp} bounds, c.ord
    ) buckets
    GROUP BY {grp} bounds
)"""
_SET_TRIPLES = "jsonb_agg(jsonb_build_array(bounds, counts, points))"


# The plain figures of a selection without OTLP points: no histogram can be in it.
_PLAIN_STATS = """
    {agg} AS value, count(*) AS n, min(value) AS lo, max(value) AS hi, 0 AS h_points
"""


def _counting_points(points: QuerySet, group_by: str | None, otlp: bool) -> tuple[str, list]:
    """SQL (and parameters) of the points that count, as rows (value, histogram[, grp]).

    One scan of the selection: the non-cumulative points, and the cumulative ones whose
    id DISTINCT ON picked as the newest of their series (a hashed subplan, which
    sorts only the cumulative points). Without OTLP points, simply every point.
    """
    counting = points.order_by()
    if otlp:
        newest = (
            points.filter(_CUMULATIVE)
            .order_by(*_SERIES, "-recorded_at", "-id")
            .distinct(*_SERIES)
            .values("id")
        )
        counting = points.filter(~_CUMULATIVE | Q(id__in=newest)).order_by()
    columns = ["value", "histogram"]
    if group_by:
        counting = counting.annotate(grp=GROUPS[group_by]())
        columns.append("grp")
    sql, params = counting.values(*columns).query.sql_with_params()
    return sql, list(params)


def aggregate(points: QuerySet, metric: str, aggregation: str, group_by: str | None = None):
    """One aggregate of the points, or one per group (at most MAX_GROUPS, in group order).

    `value` is the aggregation; `count`, `min` and `max` come with it, all from one
    query. `value` is null when nothing matches, and for stddev of a single point
    (the sample standard deviation needs two). Cumulative OTLP points count by the
    newest of each series; a group of histogram points is answered from their
    buckets and carries a `histogram` object (see docs/metrics.md).
    """
    if aggregation not in AGGREGATIONS:
        raise QueryError(f"aggregation: must be one of {', '.join(AGGREGATIONS)}")
    if group_by is not None and group_by not in GROUPS:
        raise QueryError(f"groupBy: must be one of {', '.join(GROUPS)}")
    # Most metrics come from the API, not OTLP: their points are all plain, and the
    # rules above need not run (the partial index metric_otlp_name answers this).
    otlp = points.filter(source="otlp").exists()
    eff_sql, params = _counting_points(points, group_by, otlp)
    stats = (_STATS if otlp else _PLAIN_STATS).format(agg=AGGREGATIONS[aggregation])
    wants_buckets = otlp and aggregation in QUANTILES
    # Inlined, not materialised: a metric of plain points is read once (twice for a
    # percentile, the second read only looking for histogram points).
    head = f"WITH eff AS NOT MATERIALIZED ({eff_sql})"
    if group_by is None:
        sets = f"(SELECT {_SET_TRIPLES} FROM sets)" if wants_buckets else "NULL"
        with_sets = f", {_SETS.format(grp='')}" if wants_buckets else ""
        sql = f"{head}{with_sets} SELECT {stats}, {sets} AS sets FROM eff"
    else:
        sql = f"""{head},
            stats AS (
                SELECT grp, {stats} FROM eff GROUP BY grp
                ORDER BY grp ASC NULLS LAST LIMIT {MAX_GROUPS}
            )"""
        if wants_buckets:
            sql += f""", {_SETS.format(grp="grp,")},
                group_sets AS (SELECT grp, {_SET_TRIPLES} AS sets FROM sets GROUP BY grp)
            SELECT stats.*, group_sets.sets FROM stats
            LEFT JOIN group_sets ON group_sets.grp IS NOT DISTINCT FROM stats.grp"""
        else:
            sql += " SELECT stats.*, NULL AS sets FROM stats"
        sql += " ORDER BY stats.grp ASC NULLS LAST"
    alias = read_alias()
    with transaction.atomic(using=alias, savepoint=False), connections[alias].cursor() as cursor:
        # For this transaction only: JIT compiling these one-off aggregates costs more
        # than it saves (~1 s measured on a 100,000-point histogram query), and sorts
        # for percentiles get room in memory instead of spilling 1M values to disk.
        cursor.execute(
            "SELECT set_config('jit', 'off', true), set_config('work_mem', %s, true)",
            [f"{settings.ANALYTICS_WORK_MEM_MB}MB"],
        )
        cursor.execute(sql, params)
        names = [column.name for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    answer = {"metric": metric, "aggregation": aggregation}
    if group_by is None:
        return {**answer, **_stats(rows[0], aggregation)}
    return [{"group": _group(row["grp"]), **answer, **_stats(row, aggregation)} for row in rows]


def _stats(row: dict, aggregation: str) -> dict:
    if not row["h_points"]:
        return {"value": row["value"], "count": row["n"], "min": row["lo"], "max": row["hi"]}
    return _histogram_stats(row, aggregation)


def _histogram_stats(row: dict, aggregation: str) -> dict:
    """A group with histogram points: answered from them alone (plain points of the
    same group are left out and counted in `plain_points_ignored`)."""
    points = row["h_points"]
    count = int(row["h_count"] or 0)
    # A sum, min or max is known when every point carried one (OTLP makes them optional).
    total = row["h_sum"] if row["h_sums"] == points else None
    low = row["h_min"] if row["h_mins"] == points else None
    high = row["h_max"] if row["h_maxes"] == points else None
    detail = {
        "points": points,
        "plain_points_ignored": row["n"] - points,
        "other_bounds_points": 0,
    }
    if aggregation in QUANTILES:
        # Django's connection hands jsonb back as text (JSONField decodes its own).
        sets = row["sets"]
        bounds, counts, used = _majority(orjson.loads(sets) if isinstance(sets, str) else [])
        detail["bounds"] = bounds
        detail["other_bounds_points"] = points - used
        value = bucket_quantile(QUANTILES[aggregation], bounds, counts, low, high)
    else:
        value = {
            "sum": total,
            "avg": total / count if total is not None and count else None,
            "min": low,
            "max": high,
            "count": count,
            "stddev": None,  # OTLP histograms carry no sum of squares
        }[aggregation]
    return {"value": value, "count": count, "min": low, "max": high, "histogram": detail}


def _majority(sets: list) -> tuple[list[float], list[float], int]:
    """The bounds array holding the most observations (then the most points; then any,
    but always the same), with its merged counts and how many points it merges."""
    if not sets:
        return [], [], 0
    bounds, counts, used = max(sets, key=lambda s: (sum(s[1]), s[2], s[0]))
    return [float(b) for b in orjson.loads(bounds)], [float(n) for n in counts], int(used)


def bucket_quantile(
    q: float,
    bounds: list[float],
    counts: list[float],
    low: float | None = None,
    high: float | None = None,
) -> float | None:
    """The q-quantile of explicit-bucket counts, as Prometheus' `histogram_quantile`.

    Bucket i holds observations in (bounds[i-1], bounds[i]], the last one those above
    the last bound. The rank q × total falls in the first bucket whose cumulative
    count reaches it, and the answer is interpolated linearly inside that bucket. The
    first bucket starts at 0 (at its bound when that is not positive), the last one
    answers its lower bound; when the observed minimum (`low`) or maximum (`high`) is
    known, bucket edges are tightened to them, so the first bucket starts at the
    minimum and the last one ends at the maximum.
    """
    total = sum(counts)
    if not counts or total <= 0 or len(counts) != len(bounds) + 1:
        return None
    rank = q * total
    below = 0.0
    i = 0
    for i, n in enumerate(counts):  # noqa: B007 (the bucket found is used below)
        if below + n >= rank and n > 0:
            break
        below += n
    n = counts[i]
    if i == 0:
        lower = low if low is not None else (0.0 if bounds and bounds[0] > 0 else None)
    else:
        lower = bounds[i - 1]
    upper = bounds[i] if i < len(bounds) else high
    if lower is None:  # a first bucket ending at or below 0, min unknown
        return bounds[0] if bounds else None
    if upper is None:  # the +Inf bucket, max unknown
        return lower
    if low is not None:
        lower = max(lower, low)
    if high is not None:
        upper = min(upper, high)
    upper = max(upper, lower)
    return lower + (upper - lower) * (rank - below) / n


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
