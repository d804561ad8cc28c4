"""GET /metrics: Runlens's own counters and the stored runs, for Prometheus to scrape.

A `prometheus_client` collector on a registry of our own, rendered by the library:
text exposition 0.0.4 by default, OpenMetrics 1.0 when the scraper's Accept header asks
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
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from portal.http import allow_methods
from runs.models import Run
from telemetry import ratelimit

SETTLE_AFTER = timedelta(minutes=5)
# Batch processing latency (received -> stored), seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Run durations, seconds: agent runs last from seconds to hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
# `le` label values, +Inf last, in the Go float format OpenMetrics parsers insist on.
LATENCY_LE = tuple(floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf))
DURATION_LE = tuple(floatToGoString(b) for b in (*DURATION_BUCKETS, math.inf))
MAX_SLUG_SERIES = 2000  # project/slug pairs exposed (the busiest by runs kept)

ENDPOINTS = {
    "events": "/api/ingest/events",
    "metrics": "/api/metrics/record",
    "otlp_logs": "/v1/logs",
    "otlp_metrics": "/v1/metrics",
    "otlp_traces": "/v1/traces",
}


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


def _buckets(le: tuple[str, ...], cumulative: list[int]) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs as HistogramMetricFamily takes them; +Inf last."""
    return list(zip(le, cumulative, strict=True))


def ingest_families() -> Iterator[Metric]:
    labels = ["endpoint"]
    batches = CounterMetricFamily(
        "runlens_ingest_batches", "Request bodies accepted and spooled.", labels=labels
    )
    accepted = CounterMetricFamily(
        "runlens_ingest_records_accepted", "Records accepted at the request.", labels=labels
    )
    rejected = CounterMetricFamily(
        "runlens_ingest_records_rejected",
        "Records rejected line by line in accepted requests.",
        labels=labels,
    )
    stored = CounterMetricFamily(
        "runlens_ingest_items_stored",
        "Items workers stored (events, metrics, spans).",
        labels=labels,
    )
    latency = HistogramMetricFamily(
        "runlens_ingest_batch_latency_seconds",
        "Seconds from a batch being received to a worker having stored it.",
        labels=labels,
    )
    for kind, v in sorted(ingest_totals.snapshot().items()):
        endpoint = [ENDPOINTS.get(kind, kind)]
        batches.add_metric(endpoint, int(v[0]))
        accepted.add_metric(endpoint, int(v[1]))
        rejected.add_metric(endpoint, int(v[2]))
        stored.add_metric(endpoint, int(v[3]))
        cumulative = [int(n) for n in v[6:]] + [int(v[4])]
        latency.add_metric(endpoint, _buckets(LATENCY_LE, cumulative), v[5])
    yield from (batches, accepted, rejected, stored, latency)


# --- Gauges and run aggregates ------------------------------------------------------------


def state_families() -> Iterator[Metric]:
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), min(received_at), coalesce(sum(octet_length(body)), 0)"
            " FROM telemetry_ingestbatch WHERE state = 'pending'"
        )
        backlog, oldest, backlog_bytes = cursor.fetchone()
    yield GaugeMetricFamily(
        "runlens_ingest_backlog", "Batches spooled and waiting for a worker.", value=backlog
    )
    yield GaugeMetricFamily(
        "runlens_ingest_backlog_bytes",
        "Spooled bytes waiting for a worker; writes are refused past BACKLOG_MAX_BYTES.",
        value=backlog_bytes,
    )
    yield GaugeMetricFamily(
        "runlens_ingest_oldest_pending_seconds",
        "Age of the oldest pending batch.",
        value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
    )
    yield GaugeMetricFamily(
        "runlens_runs_orphaned",
        "Runs marked orphaned or silent past ORPHAN_AFTER_SECONDS (the orange banner).",
        value=Run.objects.orphans(now).count(),
    )


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


def run_families() -> Iterator[Metric]:
    labels = ["project", "slug"]
    runs = GaugeMetricFamily(
        "runlens_runs", "Runs kept, by project, slug and status.", labels=[*labels, "status"]
    )
    tokens_in = GaugeMetricFamily(
        "runlens_run_tokens_in", "Input tokens of the runs kept.", labels=labels
    )
    tokens_out = GaugeMetricFamily(
        "runlens_run_tokens_out", "Output tokens of the runs kept.", labels=labels
    )
    cost = GaugeMetricFamily(
        "runlens_run_cost_usd", "Cost in US dollars of the runs kept.", labels=labels
    )
    duration = HistogramMetricFamily(
        "runlens_run_duration_seconds", "Durations of the finished runs kept.", labels=labels
    )
    with connection.cursor() as cursor:
        cursor.execute(_RUNS_SQL)
        rows = cursor.fetchall()
    for row in rows:
        pair = [row[0], row[1]]
        for status, n in zip(STATUSES, row[3:9], strict=True):
            if n:
                runs.add_metric([*pair, status], n)
        tokens_in.add_metric(pair, int(row[9]))
        tokens_out.add_metric(pair, int(row[10]))
        cost.add_metric(pair, float(row[11]))
        if row[12]:
            cumulative = [int(n) for n in row[14:]] + [int(row[12])]
            duration.add_metric(pair, _buckets(DURATION_LE, cumulative), int(row[13]) / 1000)
    yield from (runs, tokens_in, tokens_out, cost, duration)


class RunlensCollector(Collector):
    """Every family of /metrics, read from PostgreSQL at each scrape (one query per group)."""

    def collect(self) -> Iterator[Metric]:
        yield from ingest_families()
        yield from state_families()
        yield from run_families()


# Our own registry, not prometheus_client's global REGISTRY: the scrape shows Runlens's
# families only, not the process and platform collectors the default one carries. No
# `describe()` and auto_describe off, so registering does not query the database.
registry = CollectorRegistry()
registry.register(RunlensCollector())


# --- The view -----------------------------------------------------------------------------


def _loopback(request: HttpRequest) -> bool:
    # The client as the rate limiter sees it: behind a reverse proxy on this host
    # (TRUSTED_PROXY_COUNT), REMOTE_ADDR is loopback for every client.
    try:
        return ipaddress.ip_address(ratelimit.client_ip(request)).is_loopback
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
    # Not the library's choose_encoder(): it takes the name escaping from Accept (so the
    # slow underscores path below for most scrapers) and varies the Content-Type with it.
    return "application/openmetrics-text" in request.headers.get("Accept", "")


@allow_methods("GET")
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        response = JsonResponse(
            {"detail": "authentication required: send Authorization: Bearer <METRICS_TOKEN>"},
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="runlens-metrics"'
        return response
    if wants_openmetrics(request):
        # allow-utf-8 rather than the default underscores escaping: measured, half the
        # render time (docs/operations.md), because 0.26.0's underscores path escapes
        # every sample's name character by character. Every name here is a legacy one,
        # so both schemes give the same bytes (tests/test_prometheus.py checks).
        body = openmetrics.generate_latest(registry, escaping=openmetrics.ALLOWUTF8)
        response = HttpResponse(body, content_type=openmetrics.CONTENT_TYPE_LATEST)
    else:
        response = HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)
    response["Vary"] = "Accept"
    return response
