"""GET /metrics: Runlens's own counters and the stored runs, for Prometheus to scrape.

Text exposition 0.0.4 by default; OpenMetrics 1.0 when the scraper's Accept header asks
for `application/openmetrics-text` (as Prometheus does). Every family is listed, with
its type and labels, in docs/operations.md.

Where the numbers come from, so several web processes agree without sharing memory:

* ingest counters and the batch latency histogram are totals over the ingest spool
  (`IngestBatch` rows and their `summary`), read from PostgreSQL. The spool is never
  pruned, so the totals only grow. Each process keeps the totals of settled batches
  (not pending, received more than SETTLE_AFTER ago) and reads only newer rows on the
  next scrape, so a scrape costs the recent batches, not the whole table;
* gauges (backlog, runs by status, orphans) are counted from their indexes each time;
* token, cost and duration figures are sums over the stored runs by project and slug.
  Retention deletes runs, so these go down as well as up: they are gauges (and the
  duration histogram describes the runs kept), never counters that would fake resets.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

SETTLE_AFTER = timedelta(minutes=5)
# Batch processing latency (received -> stored), seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Run durations, seconds: agent runs last from seconds to hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
MAX_SLUG_SERIES = 2000  # project/slug pairs exposed (the busiest by runs kept)

ENDPOINTS = {
    "events": "/api/ingest/events",
    "metrics": "/api/metrics/record",
    "otlp_logs": "/v1/logs",
    "otlp_metrics": "/v1/metrics",
    "otlp_traces": "/v1/traces",
}


# --- The exposition format ------------------------------------------------------------


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def number(value: float | int) -> str:
    """Go's float formatting, which OpenMetrics parsers insist on for `le`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6 and "e" not in text:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str  # without `_total` for counters
    type: str  # counter, gauge, histogram
    help: str
    samples: list[tuple[str, Labels, float | int]] = field(default_factory=list)

    def add(self, value: float | int, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, tuple(labels.items()), value))

    def histogram(
        self, labels: dict[str, str], bounds: Iterable[float], cumulative: list[int], total: float
    ) -> None:
        """Buckets (cumulative counts, one per bound, then +Inf), _sum and _count."""
        count = cumulative[-1] if cumulative else 0
        for bound, n in zip((*bounds, math.inf), cumulative, strict=True):
            self.add(n, "_bucket", **labels, le=number(float(bound)))
        self.add(float(total), "_sum", **labels)
        self.add(count, "_count", **labels)

    def render(self, openmetrics: bool) -> list[str]:
        # 0.0.4 names a counter family by its sample name; OpenMetrics without `_total`.
        head = self.name if openmetrics or self.type != "counter" else self.name + "_total"
        lines = [f"# HELP {head} {escape_help(self.help)}", f"# TYPE {head} {self.type}"]
        for suffix, labels, value in self.samples:
            if self.type == "counter":
                suffix = "_total"
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            lines.append(
                f"{self.name}{suffix}{{{text}}} {number(value)}"
                if text
                else f"{self.name}{suffix} {number(value)}"
            )
        return lines


def render(families: list[Family], openmetrics: bool) -> str:
    lines = [line for family in families for line in family.render(openmetrics)]
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


# --- Ingest totals: incremental over the spool ------------------------------------------

_LATENCY = "extract(epoch FROM processed_at - received_at)"
_BUCKET_COLUMNS = ",\n".join(
    f"count(*) FILTER (WHERE state = 'done' AND {_LATENCY} <= {bound})" for bound in LATENCY_BUCKETS
)


def _json_int(key: str) -> str:
    # A summary written by any endpoint: only numbers count, anything else is 0.
    return (
        f"coalesce(sum(CASE WHEN jsonb_typeof(summary->'{key}') = 'number' "
        f"THEN (summary->>'{key}')::numeric END), 0)"
    )


_INGEST_SQL = f"""
SELECT kind,
  count(*),
  {_json_int("accepted")},
  {_json_int("rejected")},
  coalesce(sum(CASE WHEN state = 'done' AND jsonb_typeof(summary->'stored') = 'number'
                    THEN (summary->>'stored')::numeric END), 0),
  count(*) FILTER (WHERE state = 'done'),
  coalesce(sum({_LATENCY}) FILTER (WHERE state = 'done'), 0),
  {_BUCKET_COLUMNS}
FROM telemetry_ingestbatch
WHERE id > %s AND id <= %s
GROUP BY kind
"""
_WIDTH = 6 + len(LATENCY_BUCKETS)  # batches, accepted, rejected, stored, done, latency sum, …


class IngestTotals:
    """Per-process running totals of settled batches, plus a fresh read of the rest.

    A batch is settled once it is no longer pending and was received SETTLE_AFTER ago:
    by then its transaction has long committed and its row will not change, so its
    numbers can be added once and never read again.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.settled_id = 0
        self.totals: dict[str, list[float]] = {}

    @staticmethod
    def _read(cursor, low: int, high: int) -> dict[str, list[float]]:
        cursor.execute(_INGEST_SQL, [low, high])
        return {row[0]: [float(v) for v in row[1:]] for row in cursor.fetchall()}

    def snapshot(self) -> dict[str, list[float]]:
        cutoff = timezone.now() - SETTLE_AFTER
        with self.lock, connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT (SELECT max(id) FROM telemetry_ingestbatch),
                       (SELECT min(id) FROM telemetry_ingestbatch WHERE state = 'pending')
                """
            )
            newest, oldest_pending = cursor.fetchone()
            newest = newest or 0
            # Settle up to the newest batch received before the cutoff, below any pending one.
            cursor.execute(
                "SELECT max(id) FROM telemetry_ingestbatch WHERE id > %s AND id < %s"
                " AND received_at < %s",
                [self.settled_id, oldest_pending or newest + 1, cutoff],
            )
            settle_to = cursor.fetchone()[0]
            if settle_to:
                for kind, values in self._read(cursor, self.settled_id, settle_to).items():
                    into = self.totals.setdefault(kind, [0.0] * _WIDTH)
                    for i, value in enumerate(values):
                        into[i] += value
                self.settled_id = settle_to
            merged = {kind: list(values) for kind, values in self.totals.items()}
            for kind, values in self._read(cursor, self.settled_id, newest).items():
                into = merged.setdefault(kind, [0.0] * _WIDTH)
                for i, value in enumerate(values):
                    into[i] += value
        return merged


ingest_totals = IngestTotals()


def ingest_families() -> list[Family]:
    batches = Family("runlens_ingest_batches", "counter", "Request bodies accepted and spooled.")
    accepted = Family(
        "runlens_ingest_records_accepted", "counter", "Records accepted at the request."
    )
    rejected = Family(
        "runlens_ingest_records_rejected",
        "counter",
        "Records rejected line by line in accepted requests.",
    )
    stored = Family(
        "runlens_ingest_items_stored", "counter", "Items workers stored (events, metrics, spans)."
    )
    latency = Family(
        "runlens_ingest_batch_latency_seconds",
        "histogram",
        "Seconds from a batch being received to a worker having stored it.",
    )
    for kind, v in sorted(ingest_totals.snapshot().items()):
        endpoint = ENDPOINTS.get(kind, kind)
        batches.add(int(v[0]), endpoint=endpoint)
        accepted.add(int(v[1]), endpoint=endpoint)
        rejected.add(int(v[2]), endpoint=endpoint)
        stored.add(int(v[3]), endpoint=endpoint)
        cumulative = [int(n) for n in v[6:]] + [int(v[4])]
        latency.histogram({"endpoint": endpoint}, LATENCY_BUCKETS, cumulative, v[5])
    return [batches, accepted, rejected, stored, latency]


# --- Gauges and run aggregates ------------------------------------------------------------


def state_families() -> list[Family]:
    from runs.models import Run

    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), min(received_at) FROM telemetry_ingestbatch WHERE state = 'pending'"
        )
        backlog, oldest = cursor.fetchone()
    backlog_family = Family(
        "runlens_ingest_backlog", "gauge", "Batches spooled and waiting for a worker."
    )
    backlog_family.add(backlog)
    oldest_family = Family(
        "runlens_ingest_oldest_pending_seconds", "gauge", "Age of the oldest pending batch."
    )
    oldest_family.add(max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    orphaned = Family(
        "runlens_runs_orphaned",
        "gauge",
        "Runs marked orphaned or silent past ORPHAN_AFTER_SECONDS (the orange banner).",
    )
    orphaned.add(Run.objects.orphans(now).count())
    return [backlog_family, oldest_family, orphaned]


_DURATION_COLUMNS = ",\n".join(
    f"count(*) FILTER (WHERE duration_ms <= {int(bound * 1000)})" for bound in DURATION_BUCKETS
)

_RUNS_SQL = f"""
SELECT p.slug, r.slug,
  count(*),
  count(*) FILTER (WHERE r.status = 'running'),
  count(*) FILTER (WHERE r.status = 'succeeded'),
  count(*) FILTER (WHERE r.status = 'failed'),
  count(*) FILTER (WHERE r.status = 'crashed'),
  count(*) FILTER (WHERE r.status = 'orphaned'),
  count(*) FILTER (WHERE r.status = 'cancelled'),
  coalesce(sum(r.tokens_in), 0),
  coalesce(sum(r.tokens_out), 0),
  coalesce(sum(r.cost_usd), 0),
  count(r.duration_ms),
  coalesce(sum(r.duration_ms), 0),
  {_DURATION_COLUMNS}
FROM runs_run r JOIN runs_project p ON p.id = r.project_id
GROUP BY p.slug, r.slug
ORDER BY count(*) DESC, p.slug, r.slug
LIMIT {MAX_SLUG_SERIES}
"""
STATUSES = ("running", "succeeded", "failed", "crashed", "orphaned", "cancelled")


def run_families() -> list[Family]:
    runs = Family("runlens_runs", "gauge", "Runs kept, by project, slug and status.")
    tokens_in = Family("runlens_run_tokens_in", "gauge", "Input tokens of the runs kept.")
    tokens_out = Family("runlens_run_tokens_out", "gauge", "Output tokens of the runs kept.")
    cost = Family("runlens_run_cost_usd", "gauge", "Cost in US dollars of the runs kept.")
    duration = Family(
        "runlens_run_duration_seconds", "histogram", "Durations of the finished runs kept."
    )
    with connection.cursor() as cursor:
        cursor.execute(_RUNS_SQL)
        rows = cursor.fetchall()
    for row in rows:
        labels = {"project": row[0], "slug": row[1]}
        for status, n in zip(STATUSES, row[3:9], strict=True):
            if n:
                runs.add(n, **labels, status=status)
        tokens_in.add(int(row[9]), **labels)
        tokens_out.add(int(row[10]), **labels)
        cost.add(float(row[11]), **labels)
        if row[12]:
            cumulative = [int(n) for n in row[14:]] + [int(row[12])]
            duration.histogram(labels, DURATION_BUCKETS, cumulative, int(row[13]) / 1000)
    return [runs, tokens_in, tokens_out, cost, duration]


def families() -> list[Family]:
    return [*ingest_families(), *state_families(), *run_families()]


# --- The view -----------------------------------------------------------------------------


def _loopback(request: HttpRequest) -> bool:
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def allowed(request: HttpRequest) -> bool:
    """METRICS_TOKEN as a bearer token; else a logged-in operator; else loopback only
    while no token is configured (a Prometheus on the same machine)."""
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].strip().encode(), token.encode())
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_active:
        return True
    return not token and _loopback(request)


def wants_openmetrics(request: HttpRequest) -> bool:
    return "application/openmetrics-text" in request.headers.get("Accept", "")


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return JsonResponse({"detail": "method not allowed: use GET"}, status=405)
    if not allowed(request):
        response = JsonResponse(
            {"detail": "authentication required: send Authorization: Bearer <METRICS_TOKEN>"},
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="runlens-metrics"'
        return response
    openmetrics = wants_openmetrics(request)
    body = render(families(), openmetrics)
    response = HttpResponse(body, content_type=OPENMETRICS_TYPE if openmetrics else TEXT_TYPE)
    response["Vary"] = "Accept"
    return response
