"""Tool reliability, provider latency and the series behind the metrics charts.

Everything is aggregated in PostgreSQL over a time window (the BRIN indexes on event
time and metric time keep the scan to the window); Python only derives the scores.
The field names read are those the agents in the seeds send (docs/operations.md):

* a tool execution is a `tool.*` / `tool_*` event that carries an outcome or a
  duration (`tool.result`, `tool.error`, Code Buddy's single `tool_call` with
  `success` and `duration`); a bare `tool.call`/`tool.start` is only the start
  marker of a call whose result event is counted. RunMetric rows named
  `tool_duration_ms`, `tool_latency_ms` or `tool_execution_ms` (labels `tool`,
  `success`) count as executions too;
* an LLM request is an `llm.call` event: `model`, `provider`, tokens (flat or under
  `usage`), `cost_usd` (priced at ingest when the agent sent none) and a latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from portal.db import read_connection

WINDOWS = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
DEFAULT_WINDOW = "24h"
# Chart resolution per window: about 30 to 60 points.
STEPS = {
    "1h": timedelta(minutes=2),
    "24h": timedelta(minutes=30),
    "7d": timedelta(hours=6),
    "30d": timedelta(days=1),
}
ROWS = 100  # tools or models listed
TOOL_METRIC_NAMES = ("tool_duration_ms", "tool_latency_ms", "tool_execution_ms")
START_MARKERS = (
    "tool.call",
    "tool.start",
    "tool.started",
    "tool.begin",
    "tool.invoke",
    "tool_call",
    "tool_start",
)
OUTCOME_KEYS = (
    "success",
    "ok",
    "status",
    "error",
    "duration_ms",
    "latency_ms",
    "elapsed_ms",
    "duration",
    "latency",
)

# Reliability = 0.8 x success rate + 0.2 x speed score (Code Buddy's weighting).
SUCCESS_WEIGHT, SPEED_WEIGHT = 0.8, 0.2
FAST_MS, SLOW_MS = 1_000.0, 60_000.0


def window(name: str) -> tuple[str, datetime, datetime]:
    """A known window name (else the default) and its [since, until] bounds."""
    name = name if name in WINDOWS else DEFAULT_WINDOW
    until = timezone.now()
    return name, until - WINDOWS[name], until


def speed_score(p50_ms: float | None) -> float | None:
    """1 at a median of 1 s or less, 0 at 60 s or more, falling with the log between.

    Logarithmic because a tool taking 2 s instead of 1 s matters as much to an agent's
    loop as one taking 60 s instead of 30 s. None when no call reported a duration.
    """
    if p50_ms is None:
        return None
    if p50_ms <= FAST_MS:
        return 1.0
    if p50_ms >= SLOW_MS:
        return 0.0
    return 1.0 - math.log(p50_ms / FAST_MS) / math.log(SLOW_MS / FAST_MS)


def reliability(success_rate: float, speed: float | None) -> float:
    """0.8 x success rate + 0.2 x speed score; the success rate alone without durations."""
    if speed is None:
        return success_rate
    return SUCCESS_WEIGHT * success_rate + SPEED_WEIGHT * speed


def _num(source: str, key: str) -> str:
    """A JSON number under `key` as float8, else NULL (text, booleans, negatives ignored)."""
    value = f"{source}->'{key}'"
    return (
        f"CASE WHEN jsonb_typeof({value}) = 'number' AND ({source}->>'{key}')::float8 >= 0 "
        f"THEN ({source}->>'{key}')::float8 END"
    )


def _str(source: str, key: str) -> str:
    return (
        f"CASE WHEN jsonb_typeof({source}->'{key}') = 'string' "
        f"AND {source}->>'{key}' <> '' THEN left({source}->>'{key}', 200) END"
    )


def _ok(source: str, level: str = "", event: str = "") -> str:
    """Did it succeed? Explicit success/ok, then status words, then error signs."""
    parts = [
        f"WHEN jsonb_typeof({source}->'success') = 'boolean' THEN ({source}->>'success')::boolean",
        f"WHEN jsonb_typeof({source}->'ok') = 'boolean' THEN ({source}->>'ok')::boolean",
        f"WHEN lower({source}->>'success') IN ('true', 'false') "
        f"THEN lower({source}->>'success') = 'true'",
        f"WHEN lower({source}->>'status') IN ('ok', 'success', 'succeeded', 'passed', 'done') "
        "THEN true",
        f"WHEN lower({source}->>'status') IN ('error', 'failed', 'failure', 'timeout', 'crashed') "
        "THEN false",
    ]
    if level:
        parts.append(f"WHEN {level} = 'error' THEN false")
    if event:
        parts.append(f"WHEN {event} ~ '(error|errored|fail|failed|failure|timeout)$' THEN false")
    parts.append(
        f"WHEN {source}->'error' IS NOT NULL "
        f"AND {source}->'error' NOT IN ('null'::jsonb, 'false'::jsonb, '\"\"'::jsonb) THEN false"
    )
    return "CASE " + " ".join(parts) + " ELSE true END"


def _first(*parts: str) -> str:
    return f"coalesce({', '.join(parts)})"


_EVENT_MS = _first(
    *(_num("e.data", k) for k in ("duration_ms", "latency_ms", "elapsed_ms", "duration", "latency"))
)
_TOOL_CALLS_SQL = f"""
SELECT
  {_first(*(_str("e.data", k) for k in ("tool", "tool_name", "toolName", "name")), "'(unnamed)'")}
    AS tool,
  {_ok("e.data", "e.level", "e.event")} AS ok,
  {_EVENT_MS} AS ms
FROM runs_event e {{event_join}}
WHERE e.ts >= %(since)s AND e.ts <= %(until)s
  AND (e.event LIKE 'tool.%%' OR e.event LIKE 'tool\\_%%')
  AND (e.event NOT IN ({", ".join(f"'{m}'" for m in START_MARKERS)})
       OR e.data ?| array[{", ".join(f"'{k}'" for k in OUTCOME_KEYS)}])
  {{event_filter}}
UNION ALL
SELECT
  {_first(*(_str("m.labels", k) for k in ("tool", "tool_name", "name")), "'(unnamed)'")},
  {_ok("m.labels")},
  CASE WHEN m.value >= 0 THEN m.value END
FROM runs_runmetric m {{metric_join}}
WHERE m.recorded_at >= %(since)s AND m.recorded_at <= %(until)s
  AND m.name IN ({", ".join(f"'{n}'" for n in TOOL_METRIC_NAMES)})
  {{metric_filter}}
"""
_TOOLS_SQL = """
SELECT tool, count(*), count(*) FILTER (WHERE ok), count(*) FILTER (WHERE NOT ok),
  percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
  percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
  count(ms)
FROM ({calls}) calls
GROUP BY tool
ORDER BY count(*) FILTER (WHERE NOT ok) DESC, count(*) DESC, tool
LIMIT %(rows)s
"""


def _tokens(keys: tuple[str, ...]) -> str:
    return _first(
        *(_num("e.data", k) for k in keys),
        *(_num("e.data->'usage'", k) for k in keys),
        "0",
    )


_PROVIDERS_SQL = f"""
SELECT provider, model, count(*), count(*) FILTER (WHERE NOT ok),
  sum(tokens_in), sum(tokens_out), sum(cost), count(cost),
  percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
  percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
  count(ms)
FROM (
  SELECT
    {_first(_str("e.data", "provider"), "''")} AS provider,
    {_first(_str("e.data", "model"), "'(unknown)'")} AS model,
    {_tokens(("tokens_in", "input_tokens", "prompt_tokens"))} AS tokens_in,
    {_tokens(("tokens_out", "output_tokens", "completion_tokens"))} AS tokens_out,
    {_first(_num("e.data", "cost_usd"), _num("e.data->'usage'", "cost_usd"), "e.cost_usd")}
      AS cost,
    {_first(*(_num("e.data", k) for k in ("latency_ms", "duration_ms", "latency", "duration")))}
      AS ms,
    {_ok("e.data", "e.level")} AS ok
  FROM runs_event e {{join}}
  WHERE e.ts >= %(since)s AND e.ts <= %(until)s AND e.event = 'llm.call' {{filter}}
) calls
GROUP BY provider, model
ORDER BY count(*) DESC, provider, model
LIMIT %(rows)s
"""


@dataclass
class ToolStats:
    tool: str
    calls: int
    successes: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    timed: int  # calls that reported a duration

    @property
    def success_rate(self) -> float:
        return self.successes / self.calls if self.calls else 0.0

    @property
    def speed_score(self) -> float | None:
        return speed_score(self.p50_ms)

    @property
    def reliability(self) -> float:
        return reliability(self.success_rate, self.speed_score)


@dataclass
class ProviderStats:
    provider: str
    model: str
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    priced: int  # requests with a cost (sent or priced at ingest)
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    timed: int

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


def _project_sql(project_id: int | None, alias: str) -> tuple[str, str]:
    """Join and condition narrowing rows of `alias` (events via their run) to one project."""
    if project_id is None:
        return "", ""
    if alias == "m":
        return "", "AND m.project_id = %(project)s"
    return (
        f"JOIN runs_run {alias}r ON {alias}r.id = {alias}.run_id",
        f"AND {alias}r.project_id = %(project)s",
    )


def tool_stats(
    since: datetime, until: datetime, project_id: int | None = None, rows: int = ROWS
) -> list[ToolStats]:
    """Per tool: calls, successes, errors, latency percentiles; most failures first."""
    event_join, event_filter = _project_sql(project_id, "e")
    _, metric_filter = _project_sql(project_id, "m")
    calls = _TOOL_CALLS_SQL.format(
        event_join=event_join,
        event_filter=event_filter,
        metric_join="",
        metric_filter=metric_filter,
    )
    params = {"since": since, "until": until, "project": project_id, "rows": rows}
    with read_connection().cursor() as cursor:
        cursor.execute(_TOOLS_SQL.format(calls=calls), params)
        return [
            ToolStats(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7])
            for row in cursor.fetchall()
        ]


def provider_stats(
    since: datetime, until: datetime, project_id: int | None = None, rows: int = ROWS
) -> list[ProviderStats]:
    """Per provider and model: requests, errors, tokens, cost, latency percentiles."""
    join, where = _project_sql(project_id, "e")
    params = {"since": since, "until": until, "project": project_id, "rows": rows}
    with read_connection().cursor() as cursor:
        cursor.execute(_PROVIDERS_SQL.format(join=join, filter=where), params)
        return [
            ProviderStats(
                provider=row[0],
                model=row[1],
                requests=row[2],
                errors=row[3],
                tokens_in=int(row[4] or 0),
                tokens_out=int(row[5] or 0),
                cost_usd=float(row[6] or 0),
                priced=row[7],
                p50_ms=row[8],
                p95_ms=row[9],
                p99_ms=row[10],
                timed=row[11],
            )
            for row in cursor.fetchall()
        ]


# --- Chart series ------------------------------------------------------------------------


def metric_names(since: datetime, until: datetime, limit: int = 200) -> list[str]:
    """RunMetric names recorded in the window, for the chart's select list."""
    from runs.models import RunMetric

    names = (
        RunMetric.objects.filter(recorded_at__gte=since, recorded_at__lte=until)
        .values_list("name", flat=True)
        .distinct()
        .order_by("name")
    )
    return list(names[:limit])


SERIES_KEYS = {
    "slug": "coalesce(nullif(r.slug, ''), '(no run)')",
    "model": "coalesce(nullif(left(m.labels->>'model', 200), ''), '(no model)')",
}


def metric_series(
    name: str,
    since: datetime,
    until: datetime,
    step: timedelta,
    by: str = "slug",
    limit: int = 6,
) -> tuple[dict[str, list[tuple[datetime, float, int]]], str, int]:
    """Average of one metric per time step, one series per slug (or model label).

    OTLP points follow the aggregates' rules (docs/metrics.md, "What an OTLP point
    counts for"): a cumulative series counts by its newest point in each step (its
    running total then), and a step holding histogram points plots their mean
    observation (sum of sums / sum of counts), not the per-point sums.

    Returns the `limit` series with the most points, the unit, and how many series
    were left out.
    """
    key = SERIES_KEYS.get(by, SERIES_KEYS["slug"])
    counted = """
        SELECT date_bin(%(step)s, m.recorded_at, %(origin)s) AS t, {key} AS series,
               m.value, m.unit, m.histogram, m.project_id, m.run_id, m.labels, m.recorded_at, m.id
        FROM runs_runmetric m LEFT JOIN runs_run r ON r.id = m.run_id
        WHERE m.name = %(name)s AND m.recorded_at >= %(since)s AND m.recorded_at <= %(until)s
          AND {cumulative}"""
    cumulative = "(m.source = 'otlp' AND m.labels @> '{\"otel.temporality\": \"cumulative\"}')"
    sql = f"""
        SELECT t, series,
               CASE WHEN count(histogram) > 0
                    THEN sum((histogram->>'sum')::float8)
                         / nullif(sum((histogram->>'count')::float8), 0)
                    ELSE avg(value) END,
               count(*), max(unit)
        FROM (
            {counted.format(key=key, cumulative=f"NOT {cumulative}")}
            UNION ALL
            SELECT * FROM (
                SELECT DISTINCT ON (t, c.project_id, c.run_id, c.labels) * FROM (
                    {counted.format(key=key, cumulative=cumulative)}
                ) c
                ORDER BY t, c.project_id, c.run_id, c.labels, c.recorded_at DESC, c.id DESC
            ) latest
        ) points
        GROUP BY 1, 2
        ORDER BY 1
    """
    params = {"step": step, "origin": since, "name": name, "since": since, "until": until}
    with read_connection().cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    series: dict[str, list[tuple[datetime, float, int]]] = {}
    weight: dict[str, int] = {}
    unit = ""
    for t, label, value, n, row_unit in rows:
        if value is None:  # histogram points that hold no observation
            continue
        series.setdefault(label, []).append((t, float(value), n))
        weight[label] = weight.get(label, 0) + n
        unit = unit or row_unit or ""
    keep = sorted(series, key=lambda label: (-weight[label], label))[:limit]
    return {label: series[label] for label in keep}, unit, max(0, len(series) - limit)


def cost_per_slug_day(
    since: datetime, until: datetime, limit: int = 6
) -> tuple[list[datetime], dict[str, list[float]]]:
    """Run cost (the runs' counters) per slug and UTC day the run started.

    The `limit` costliest slugs get their own series; the rest are summed as "other".
    """
    first = since.replace(hour=0, minute=0, second=0, microsecond=0)
    sql = """
        SELECT date_trunc('day', started_at AT TIME ZONE 'UTC') AS day,
               coalesce(nullif(slug, ''), '(no slug)'), sum(cost_usd)
        FROM runs_run
        WHERE started_at >= %s AND started_at <= %s AND cost_usd > 0
        GROUP BY 1, 2
    """
    with read_connection().cursor() as cursor:
        cursor.execute(sql, [first, until])
        rows = cursor.fetchall()
    days: list[datetime] = []
    day = first
    while day <= until:
        days.append(day)
        day += timedelta(days=1)
    index = {d.date(): i for i, d in enumerate(days)}
    totals: dict[str, float] = {}
    for _, slug, cost in rows:
        totals[slug] = totals.get(slug, 0.0) + float(cost)
    keep = set(sorted(totals, key=lambda s: (-totals[s], s))[:limit])
    series: dict[str, list[float]] = {}
    for day_value, slug, cost in rows:
        label = slug if slug in keep else "other"
        values = series.setdefault(label, [0.0] * len(days))
        i = index.get(day_value.date())
        if i is not None:
            values[i] += float(cost)
    ordered = sorted(series, key=lambda s: (s == "other", -sum(series[s]), s))
    return days, {label: series[label] for label in ordered}


def run_metric_panel(run_pk: int, per_name: int = 60, names: int = 50) -> list[dict]:
    """A run's metrics by name: the latest value with its unit, and the newest
    `per_name` values in order (for a sparkline when a name repeats). One query."""
    sql = """
        SELECT name, value, unit, recorded_at, total FROM (
            SELECT name, value, unit, recorded_at,
                   row_number() OVER (PARTITION BY name ORDER BY recorded_at DESC, id DESC) AS k,
                   count(*) OVER (PARTITION BY name) AS total,
                   dense_rank() OVER (ORDER BY name) AS n
            FROM runs_runmetric WHERE run_id = %s
        ) ranked
        WHERE k <= %s AND n <= %s
        ORDER BY name, recorded_at, k DESC
    """
    with read_connection().cursor() as cursor:
        cursor.execute(sql, [run_pk, per_name, names])
        rows = cursor.fetchall()
    panel: dict[str, dict] = {}
    for name, value, unit, at, total in rows:
        entry = panel.setdefault(name, {"name": name, "values": [], "unit": unit, "count": total})
        entry["values"].append((at, value))
        entry["latest"], entry["unit"], entry["at"] = value, unit or entry["unit"], at
    return list(panel.values())
