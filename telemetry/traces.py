"""Traces read back from stored spans: the tree, the waterfall layout, per-name statistics.

Spans arrive in any order and are stored flat (`Span.parent_span_id`, no key), so the
tree is rebuilt here at read time, in Python, from one query's rows. The statistics
are computed by PostgreSQL (`percentile_cont`), never by loading durations.
See docs/traces.md for the decisions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import (
    Count,
    F,
    Func,
    IntegerField,
    Max,
    Min,
    Q,
    Window,
)
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from portal.db import read_connection
from runs.formatting import duration
from runs.models import Project, Run
from telemetry.models import Span

MAX_SPANS = 2000  # rows a waterfall renders; the page says when a trace has more
MIN_BAR_PCT = 0.2  # an instant span still shows as a sliver
TRACE_ID = re.compile(r"[0-9a-f]{32}")
SPAN_ID = re.compile(r"[0-9a-f]{16}")
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
STATS_ORDERS = ("p95", "count")
STATS_LIMIT = 200


def normalize_trace_id(value: str) -> str | None:
    """32 lowercase hex digits, or None. A UUID (dashes, any case) counts: some agents
    use their run's UUID as the trace id. The all-zero id is invalid in W3C and OTLP."""
    value = (value or "").strip().lower().replace("-", "")
    if TRACE_ID.fullmatch(value) and value != "0" * 32:
        return value
    return None


def is_span_id(value: str) -> bool:
    return bool(SPAN_ID.fullmatch(value or ""))


# --- The tree ---------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """One waterfall row: a span, where it sits in the tree and where its bar goes."""

    span: Span
    depth: int = 0
    children: list[Node] = field(default_factory=list)
    orphan: bool = False  # it names a parent that was never received
    looped: bool = False  # its ancestors loop back to it; shown at root level
    offset: float = 0.0  # bar start, % of the trace's duration
    width: float = 0.0  # bar length, % of the trace's duration
    start_ms: float = 0.0  # from the trace's start

    @property
    def x(self) -> str:
        """SVG attribute values, formatted here: templates would localise a float."""
        return f"{self.offset:.3f}%"

    @property
    def w(self) -> str:
        return f"{self.width:.3f}%"

    @property
    def is_error(self) -> bool:
        return self.span.status_code == Span.StatusCode.ERROR

    @property
    def duration(self) -> str:
        return duration(self.span.duration_ms)

    @property
    def starts(self) -> str:
        return duration(self.start_ms)

    @property
    def linkable(self) -> bool:
        """Only a well-formed span id goes into the URL of its details."""
        return is_span_id(self.span.span_id)

    @property
    def indent(self) -> int:
        """The depth as drawn: CSS classes exist up to 24, the number is shown beyond."""
        return min(self.depth, 24)


def _order(node: Node) -> tuple:
    # Siblings by start; equal starts by span id, so the order never depends on arrival.
    return (node.span.start_time, node.span.span_id)


def build_tree(spans: Iterable[Span]) -> list[Node]:
    """The rows of a waterfall in display order: depth first, children by start time.

    - A span whose parent is missing is shown at root level, marked `orphan`
      (the parent may still be on its way, or was lost).
    - Parent chains that loop (bad data: A→B→A, or a span its own parent) cannot
      be reached from a root; the earliest span of each loop is shown at root level,
      marked `looped`, and the walk visits every span once, so nothing loops forever.
    - The walk keeps its own stack: a trace nested thousands deep is no recursion risk.
    """
    nodes = [Node(span) for span in spans]
    by_id: dict[str, Node] = {}
    for node in nodes:
        by_id.setdefault(node.span.span_id, node)
    roots: list[Node] = []
    for node in nodes:
        parent_id = node.span.parent_span_id
        parent = by_id.get(parent_id) if parent_id else None
        if not parent_id:
            roots.append(node)
        elif parent is None:
            node.orphan = True
            roots.append(node)
        elif parent is node:
            node.looped = True
            roots.append(node)
        else:
            parent.children.append(node)
    for node in nodes:
        node.children.sort(key=_order)

    rows: list[Node] = []
    seen: set[int] = set()

    def walk(root: Node) -> None:
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            node.depth = depth
            rows.append(node)
            stack.extend((child, depth + 1) for child in reversed(node.children))

    for root in sorted(roots, key=_order):
        walk(root)
    if len(rows) < len(nodes):  # only loops are left: break each at its earliest span
        for node in sorted((n for n in nodes if id(n) not in seen), key=_order):
            if id(node) not in seen:
                node.looped = True
                walk(node)
    return rows


# --- Layout -----------------------------------------------------------------------


@dataclass
class Tick:
    offset: float  # % of the trace's duration
    label: str
    anchor: str  # SVG text-anchor: the first and last labels stay inside the axis

    @property
    def x(self) -> str:
        return f"{self.offset:.3f}%"


def _ms(delta: timedelta) -> float:
    return delta.total_seconds() * 1000


def layout(rows: list[Node]) -> tuple[datetime | None, float]:
    """Give every row its bar, in % of the trace's span (first start to last end).

    Returns the trace's start and duration in ms. An instant span (or an instant
    trace) still gets a sliver of MIN_BAR_PCT, kept inside the axis.
    """
    if not rows:
        return None, 0.0
    start = min(node.span.start_time for node in rows)
    end = max(max(node.span.end_time, node.span.start_time) for node in rows)
    total = _ms(end - start)
    for node in rows:
        span = node.span
        if total > 0:
            offset = _ms(span.start_time - start) / total * 100
            width = max(0.0, _ms(span.end_time - span.start_time)) / total * 100
        else:
            offset = width = 0.0
        width = max(width, MIN_BAR_PCT)
        node.start_ms = _ms(span.start_time - start)
        node.offset = round(min(offset, 100 - width), 3)
        node.width = round(width, 3)
    return start, total


def _tick_label(value: float) -> str:
    """Each label in its own unit: 0, 200 ms, 400 ms … 1 s, 1.2 s."""
    if value == 0:
        return "0"
    if value >= 3_600_000:
        return f"{value / 3_600_000:.4g} h"
    if value >= 60_000:
        return f"{value / 60_000:.4g} min"
    if value >= 1000:
        return f"{value / 1000:.4g} s"
    return f"{value:.4g} ms"


# Steps a reader counts in: decimal below a second, then clock steps.
CLOCK_STEPS_MS = [
    *(n * 1000 for n in (1, 2, 5, 10, 15, 30)),
    *(n * 60_000 for n in (1, 2, 5, 10, 15, 30)),
    *(n * 3_600_000 for n in (1, 2, 3, 6, 12, 24)),
]


def _decimal_step(raw: float) -> float:
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _step(raw: float) -> float:
    if raw < 1000:
        return _decimal_step(raw)
    for step in CLOCK_STEPS_MS:
        if step >= raw:
            return step
    return 86_400_000 * _decimal_step(raw / 86_400_000)


def ticks(total_ms: float, target: int = 5) -> list[Tick]:
    """Axis ticks at a round step giving about `target` intervals over the trace."""
    if total_ms <= 0:
        return [Tick(0.0, "0", "start")]
    step = _step(total_ms / target)
    found = []
    i = 0
    while (value := round(i * step, 9)) <= total_ms * (1 + 1e-9):
        offset = min(value / total_ms * 100, 100.0)
        anchor = "start" if i == 0 else ("end" if offset > 95 else "middle")
        found.append(Tick(round(offset, 3), _tick_label(value), anchor))
        i += 1
    return found


# --- One trace --------------------------------------------------------------------


@dataclass
class Trace:
    trace_id: str
    project: Project
    rows: list[Node]
    total: int  # spans stored for this trace in this project
    start: datetime | None
    duration_ms: float
    ticks: list[Tick]
    runs: list[Run]
    other_projects: list[Project]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.rows)

    @property
    def duration(self) -> str:
        return duration(self.duration_ms)

    @property
    def errors(self) -> int:
        return sum(1 for node in self.rows if node.is_error)

    @property
    def services(self) -> list[str]:
        return sorted({node.span.service for node in self.rows if node.span.service})

    @property
    def root(self) -> Node | None:
        return next((n for n in self.rows if not n.span.parent_span_id), None)

    @property
    def orphans(self) -> int:
        return sum(1 for node in self.rows if node.orphan)


class EventCount(Func):
    """Events of a span, counted in SQL so the waterfall need not load them."""

    template = (
        "CASE WHEN jsonb_typeof(%(expressions)s) = 'array' "
        "THEN jsonb_array_length(%(expressions)s) ELSE 0 END"
    )
    output_field = IntegerField()


def trace_spans(trace_id: str, project_slug: str = ""):
    """The spans of a trace in every project (operators see them all).

    `project_id IN (SELECT id FROM projects)` lets PostgreSQL use the unique
    (project, trace_id, span_id) index once per project instead of scanning the table.
    """
    projects = Project.objects.all()
    if project_slug:
        projects = projects.filter(slug=project_slug)
    return Span.objects.filter(project__in=projects.values("pk"), trace_id=trace_id)


def _rows(spans, limit: int) -> list[Span]:
    return list(
        spans.select_related("project")
        .defer("attributes", "resource", "events", "status_message")
        .annotate(
            event_count=EventCount("events"),
            # Counted in the same query as the capped rows: the trace's size per project,
            # and whether the id is used in more than one project.
            stored=Window(Count("id"), partition_by=[F("project_id")]),
            lowest_project=Window(Min("project_id")),
            highest_project=Window(Max("project_id")),
        )
        .order_by("start_time", "span_id")[: limit + 1]
    )


def load_trace(trace_id: str, project_slug: str = "", limit: int | None = None) -> Trace | None:
    """A trace laid out for its waterfall, from one query of at most `limit` + 1 rows.

    The heavy JSON (attributes, resource, events) stays in the database: a row's
    details are fetched when it is opened. A trace id used in several projects
    (unlikely, but ids are client-made) shows the project of its earliest span and
    names the others so the page can link them (`?project=`): two more queries,
    only then.
    """
    limit = limit or MAX_SPANS
    rows = _rows(trace_spans(trace_id, project_slug), limit)
    if not rows:
        return None
    project, others = rows[0].project, []
    if rows[0].lowest_project != rows[0].highest_project:
        others = list(
            Project.objects.filter(pk__in=trace_spans(trace_id).values("project_id"))
            .exclude(pk=project.pk)
            .order_by("name")
        )
        rows = _rows(trace_spans(trace_id, project.slug), limit)
    spans = rows[:limit]
    tree = build_tree(spans)
    start, duration = layout(tree)
    run_ids = {s.run_id for s in spans if s.run_id is not None}
    return Trace(
        trace_id=trace_id,
        project=project,
        rows=tree,
        total=spans[0].stored,
        start=start,
        duration_ms=duration,
        ticks=ticks(duration),
        runs=list(Run.objects.filter(pk__in=run_ids).order_by("id")[:5]) if run_ids else [],
        other_projects=others,
    )


def load_span(trace_id: str, span_id: str, project_slug: str = "") -> Span | None:
    spans = trace_spans(trace_id, project_slug).filter(span_id=span_id)
    return spans.select_related("project").order_by("start_time").first()


def span_events(span: Span) -> list[dict]:
    """A span's events as sent, with their time from the span's start when readable."""
    found = []
    events = span.events if isinstance(span.events, list) else []
    for event in events[:1000]:
        if not isinstance(event, dict):
            continue
        moment = event.get("time")
        at = None
        if isinstance(moment, str):
            parsed = parse_datetime(moment) if len(moment) < 64 else None
            if parsed is not None and parsed.tzinfo is not None:
                at = _ms(parsed - span.start_time)
        elif isinstance(moment, int | float) and not isinstance(moment, bool):
            # Epoch nanoseconds, as in OTLP's timeUnixNano.
            try:
                at = _ms(datetime.fromtimestamp(moment / 1e9, tz=UTC) - span.start_time)
            except (OverflowError, OSError, ValueError):
                at = None
        found.append(
            {
                "name": event.get("name", ""),
                "time": moment,
                "at": duration(at) if at is not None and at >= 0 else None,
                "attributes": event.get("attributes") or {},
            }
        )
    return found


# --- A run's traces ---------------------------------------------------------------


def run_traces(run: Run, limit: int = 50) -> tuple[list[dict], bool]:
    """The traces of a run, earliest first: id, root span name, spans, duration, errors.

    Two queries: a GROUP BY over the run's spans (index on run, start_time), then
    the listed traces' root names through the (project, trace_id, span_id) index.
    """
    rows = list(
        Span.objects.filter(run_id=run.pk)
        .values("trace_id")
        .annotate(
            spans=Count("id"),
            errors=Count("id", filter=Q(status_code=Span.StatusCode.ERROR)),
            start=Min("start_time"),
            end=Max("end_time"),
        )
        .order_by("start", "trace_id")[: limit + 1]
    )
    more, rows = len(rows) > limit, rows[:limit]
    roots = (
        dict(
            Span.objects.filter(
                project_id=run.project_id, trace_id__in=[row["trace_id"] for row in rows]
            )
            .filter(parent_span_id="")
            .order_by("trace_id", "start_time")
            .distinct("trace_id")
            .values_list("trace_id", "name")
        )
        if rows
        else {}
    )
    for row in rows:
        row["root"] = roots.get(row["trace_id"], "")
        row["duration"] = duration(_ms(row["end"] - row["start"]))
    return rows, more


# --- Per-name statistics ----------------------------------------------------------


@dataclass
class NameStats:
    project: Project | None
    service: str
    name: str
    count: int
    errors: int
    p50: float
    p95: float
    p99: float
    latest_trace: str | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def error_pct(self) -> str:
        return f"{self.error_rate * 100:.1f}%"


def window_since(window: str, now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - WINDOWS[window]


STATS_SQL = """
WITH stats AS (
    SELECT project_id, service, name,
           count(*) AS count,
           count(*) FILTER (WHERE status_code = %(error)s) AS errors,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99
    FROM {table}
    WHERE start_time >= %(since)s {service_filter}
    GROUP BY project_id, service, name
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT stats.*,
       (SELECT latest.trace_id FROM {table} latest
        WHERE latest.project_id = stats.project_id AND latest.name = stats.name
              AND latest.service = stats.service
        ORDER BY latest.start_time DESC LIMIT 1) AS latest_trace
FROM stats
ORDER BY {order}
"""
STATS_ORDER_SQL = {
    "p95": "p95 DESC, count DESC, name, service, project_id",
    "count": "count DESC, p95 DESC, name, service, project_id",
}


def span_stats(
    window: str = "24h",
    service: str = "",
    order: str = "p95",
    now: datetime | None = None,
    limit: int = STATS_LIMIT,
) -> list[NameStats]:
    """Count, error rate and p50/p95/p99 duration per (project, service, span name)
    over the window, in one GROUP BY, slowest (or busiest) first.

    Plain SQL because of its shape: the latest trace of each name must be looked up
    only for the rows shown (one probe of the (project, name, start_time) index
    each), after the LIMIT. The ORM would group by that subquery and run it for
    every span in the window. The three percentiles share one sort per group.
    """
    sql = STATS_SQL.format(
        table=Span._meta.db_table,
        service_filter="AND service = %(service)s" if service else "",
        order=STATS_ORDER_SQL.get(order, STATS_ORDER_SQL["p95"]),
    )
    params = {
        "error": Span.StatusCode.ERROR.value,
        "since": window_since(window, now),
        "service": service,
        "limit": limit,
    }
    with read_connection().cursor() as cursor:
        cursor.execute(sql, params)
        columns = [col.name for col in cursor.description]
        rows = [dict(zip(columns, values, strict=True)) for values in cursor.fetchall()]
    projects = Project.objects.in_bulk({row["project_id"] for row in rows}) if rows else {}
    return [NameStats(project=projects.get(row.pop("project_id")), **row) for row in rows]


def services_in_window(window: str, now: datetime | None = None, limit: int = 200) -> list[str]:
    """The services that sent spans in the window: the filter's choices."""
    spans = Span.objects.filter(start_time__gte=window_since(window, now)).exclude(service="")
    return list(spans.values_list("service", flat=True).distinct().order_by("service")[:limit])
