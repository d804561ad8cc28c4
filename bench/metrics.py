"""Metrics benchmark: aggregates over 1M run metric points, in SQL and in Python.

    .venv/bin/python bench/metrics.py [--points 1000000] [--runs 10000] [--repeat 5] [--keep]

A dedicated database `runlens_bench_metrics` on the server of `DATABASE_URL` (or
the embedded PostgreSQL when that is unset), migrated by the portal and dropped at
the end (bench/reads.py's helpers). It is seeded with COPY: `--runs` runs over 20
slugs and `--points` metric points, 100 a run, five standard names in turn
(duration_ms, tokens_in, tokens_out, cost_usd, files_changed: a fifth of the points
each), four models in the `model` label, spread over 90 days and written in time
order as agents would send them; then VACUUM ANALYZE.

Each question is answered twice, for the duration_ms points (200,000 of 1M;
all of them with --names 1, the worst case):

  sql     runs.analytics.aggregate(), as GET /api/analytics/metrics runs it: one query;
  python  the naive way: fetch the values through the ORM, compute in Python
          (statistics.mean / statistics.quantiles, dicts for the groups).

Figures are medians of --repeat runs after one warm-up. Target: every SQL
aggregate under 0.5 s. Also timed: the export of the same points as CSV (the
streamed response's body, from the server-side cursor), and the record path for
one body of 50,000 points (request judging; worker judging, pricing, COPY and
counters, rolled back).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
from reads import configured_url, create_database  # bench/ is sys.path[0]

BENCH_DB = "runlens_bench_metrics"
TARGET_S = 0.5
START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 90
SLUGS = 20
NAMES = ["duration_ms", "tokens_in", "tokens_out", "cost_usd", "files_changed"]
UNITS = {"duration_ms": "ms", "tokens_in": "tokens", "tokens_out": "tokens", "cost_usd": "USD"}
MODELS = ["claude-sonnet-4-5", "gpt-4o-mini", "gemini-2.5-flash", "gpt-5"]
PER_RUN = 100
COPY_CHUNK = 8 << 20  # bytes per write to the COPY


def seed(url: str, runs: int, points: int, names: int = len(NAMES)) -> float:
    """COPY the runs and their points; returns the seconds the metric COPY took."""
    span = timedelta(days=DAYS).total_seconds()
    run_buf = io.StringIO()
    for i in range(1, runs + 1):
        started = START + timedelta(seconds=span * (i - 1) / runs)
        run_buf.write(
            f"{i}\t1\trun-{i}\torg__repo{i % SLUGS}\trun\tsucceeded\tDONE\t\t{started.isoformat()}"
            f"\t{started.isoformat()}\tt\t[]\t{{}}\t0\t0\t0\t0\t0\t0\t0\t{started.isoformat()}\n"
        )
    lines = []
    step = span / points
    for k in range(points):
        run = k // PER_RUN % runs + 1
        name = NAMES[k % names]
        model = MODELS[run % len(MODELS)]
        at = START + timedelta(seconds=k * step)
        # Deterministic, skewed values: a few slow runs make p95 differ from the mean.
        base = (k * 7919) % 1000
        value = base * (20 if k % 97 == 0 else 1) + (run % 13)
        lines.append(
            f"1\t{run}\t{name}\t{value}\t{UNITS.get(name, 'files')}"
            f'\t{{"model": "{model}"}}\t{at.isoformat()}\tapi\n'
        )
    body = "".join(lines).encode()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        columns = (
            "id, project_id, run_id, slug, kind, status, phase, host, started_at,"
            " finished_at, exit_clean, tags, attributes, events_count, errors_count,"
            " warnings_count, tokens_in, tokens_out, cost_usd, last_seq, created"
        )
        with cur.copy(f"COPY runs_run ({columns}) FROM STDIN") as copy:
            copy.write(run_buf.getvalue())
        cur.execute("SELECT setval(pg_get_serial_sequence('runs_run', 'id'), %s)", [runs])
        conn.commit()
        began = time.perf_counter()
        with cur.copy(
            "COPY runs_runmetric (project_id, run_id, name, value, unit, labels, recorded_at,"
            " source) FROM STDIN"
        ) as copy:
            for offset in range(0, len(body), COPY_CHUNK):
                copy.write(body[offset : offset + COPY_CHUNK])
        conn.commit()
        copied = time.perf_counter() - began
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE runs_run")
        conn.execute("VACUUM ANALYZE runs_runmetric")
    return copied


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    result = fn()  # warm-up: plans, caches, the first fetch of the pages
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def questions(metric: str):
    """(label, SQL way, Python way) for each question; both return comparable numbers."""
    from django.db.models.functions import TruncDate

    from runs import analytics
    from runs.models import RunMetric

    points = analytics.points(RunMetric.objects.filter(project_id=1), metric)

    def pct(values: list[float], p: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1]

    def grouped(key: str) -> dict:
        groups: dict = defaultdict(list)
        for group, value in points.values_list(key, "value").iterator(chunk_size=10_000):
            groups[group].append(value)
        return groups

    def by_day() -> dict:
        groups: dict = defaultdict(list)
        rows = points.annotate(d=TruncDate("recorded_at", tzinfo=UTC)).values_list("d", "value")
        for group, value in rows.iterator(chunk_size=10_000):
            groups[group].append(value)
        return groups

    def values() -> list[float]:
        return list(points.values_list("value", flat=True).iterator(chunk_size=10_000))

    def agg(aggregation: str, group_by: str | None = None):
        return lambda: analytics.aggregate(points, metric, aggregation, group_by)

    return [
        ("avg", agg("avg"), lambda: statistics.mean(values())),
        ("p95", agg("p95"), lambda: pct(values(), 95)),
        (
            "avg, groupBy=slug",
            agg("avg", "slug"),
            lambda: {k: statistics.mean(v) for k, v in grouped("run__slug").items()},
        ),
        (
            "p95, groupBy=day",
            agg("p95", "day"),
            lambda: {k: pct(v, 95) for k, v in by_day().items()},
        ),
        (
            "p99, groupBy=model",
            agg("p99", "model"),
            lambda: {k: pct(v, 99) for k, v in grouped("labels__model").items()},
        ),
    ]


def record_path(runs: int, items: int, repeat: int) -> tuple[float, float, int]:
    """Seconds for one `{"metrics": [...]}` body of `items` points: the request's judging
    (parse_metrics, with its run lookup) and the worker's (judge again, lock runs, price,
    COPY, counters), in this process; the worker's transaction is rolled back."""
    import orjson
    from django.db import transaction
    from django.utils import timezone

    from runs.models import Project
    from telemetry.receivers.metrics import (
        body_items,
        judge_all,
        parse_metrics,
        run_pks,
        store_metrics,
    )

    project = Project.objects.get(pk=1)
    body = orjson.dumps(
        {
            "metrics": [
                {
                    "run_id": f"run-{i % runs + 1}",
                    "metric_name": NAMES[i % len(NAMES)],
                    "metric_value": i % 1000,
                    "recorded_at": "2026-02-01T00:00:00Z",
                    "labels": {"model": MODELS[i % len(MODELS)], "host": f"h{i % 8}"},
                }
                for i in range(items)
            ]
        }
    )
    now = timezone.now()

    def request() -> None:
        parse_metrics(project, body, now)

    def worker() -> int:
        with transaction.atomic():
            good, _, _ = judge_all(body_items(body), now)
            metrics = list(good.values())
            pks = run_pks(project, {m.run_id for m in metrics}, lock=True)
            for m in metrics:
                m.run_pk = pks.get(m.run_id)
            stored = store_metrics(project, metrics)
            transaction.set_rollback(True)
        return stored

    request_s, _ = timed(request, repeat)
    worker_s, stored = timed(worker, repeat)
    return request_s, worker_s, stored


def export_time(metric: str) -> tuple[float, int]:
    from runs import analytics
    from runs.models import RunMetric

    points = analytics.points(RunMetric.objects.filter(project_id=1), metric)
    began = time.perf_counter()
    size = 0
    for chunk in analytics.csv_lines(analytics.export_rows(points)):
        size += len(chunk)
    return time.perf_counter() - began, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--names",
        type=int,
        default=len(NAMES),
        choices=range(1, len(NAMES) + 1),
        help="metric names the points take in turn (1: every point is duration_ms)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()

    server_url = configured_url()
    print(f"creating {BENCH_DB}, migrating …", flush=True)
    url = create_database(server_url, BENCH_DB)
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.db import connection, connections

    try:
        began = time.perf_counter()
        copied = seed(url, args.runs, args.points, args.names)
        print(
            f"seeded {args.points:,} points ({args.runs:,} runs) in "
            f"{time.perf_counter() - began:.1f} s; the metric COPY took {copied:.1f} s "
            f"({args.points / copied:,.0f} rows/s)",
            flush=True,
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*), pg_size_pretty(pg_total_relation_size('runs_runmetric')),"
                " version() FROM runs_runmetric WHERE name = %s",
                [NAMES[0]],
            )
            selected, on_disk, version = cursor.fetchone()
        batch = 50_000
        request_s, worker_s, stored = record_path(args.runs, batch, 3)
        print(f"  record {batch:,}: request {request_s:.3f} s, worker {worker_s:.3f} s", flush=True)
        results = []
        for label, sql, python in questions(NAMES[0]):
            sql_s, _ = timed(sql, args.repeat)
            py_s, _ = timed(python, max(1, args.repeat // 2))
            results.append((label, sql_s, py_s))
            print(f"  {label}: sql {sql_s:.3f} s, python {py_s:.3f} s", flush=True)
        export_s, export_bytes = export_time(NAMES[0])
    finally:
        connections.close_all()
        if not args.keep:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')

    print()
    print(
        f"Metrics benchmark, {platform.node()} ({os.cpu_count()} CPUs), Python "
        f"{platform.python_version()}, {version.split(' on ')[0]}"
    )
    print(
        f"  {args.points:,} points in runs_runmetric ({on_disk} with indexes), "
        f"{selected:,} of them {NAMES[0]}; medians of {args.repeat} after a warm-up"
    )
    print()
    header = f"{'question':22} {'SQL s':>7} {'Python s':>9} {'Python/SQL':>11}  verdict"
    print(header)
    print("-" * len(header))
    ok = True
    for label, sql_s, py_s in results:
        passed = sql_s < TARGET_S
        ok &= passed
        verdict = "ok" if passed else f"OVER {TARGET_S} s"
        print(f"{label:22} {sql_s:7.3f} {py_s:9.3f} {py_s / sql_s:10.1f}x  {verdict}")
    print()
    print(
        f"CSV export of {selected:,} points: {export_s:.2f} s "
        f"({selected / export_s:,.0f} rows/s, {export_bytes / 1e6:.1f} MB)"
    )
    print(
        f"POST /api/metrics/record, one body of {batch:,} points (in process, median of 3): "
        f"request judging {request_s:.2f} s ({request_s / batch * 1e6:.1f} us/point), "
        f"worker {worker_s:.2f} s ({worker_s / batch * 1e6:.1f} us/point, {stored:,} rows "
        f"with computed costs, {stored / worker_s:,.0f} rows/s)"
    )
    print(f"target: every aggregate under {TARGET_S} s: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
