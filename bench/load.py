"""Ingest under load (issue 14), in one run: what a prune of expired events and a large
CSV export cost the ingest rate, one worker process against two, and how long a
1,000-line batch waits for its answer.

    .venv/bin/python bench/load.py [--events 300000] [--batch 1000] [--threads 4]
                                   [--expired 1000000] [--export 1000000]

On a dedicated database (`runlens_bench_load`, on the server of `DATABASE_URL`, or the
embedded PostgreSQL when that is unset), freshly migrated. The same --events Gitoma
records (bench/gitoma.py) are posted as gzip NDJSON batches of --batch lines by
--threads clients to a real portal (bench/ingest.py's: gunicorn 2x2 threads, a Celery
worker, Redis), from empty event tables each time; the clock runs from the first POST
until every event is queryable:

  (1) alone         worker concurrency 2, nothing else running;
  (2) under load    the same, while retention drops a day of --expired events (COPYed
                    beforehand into a day past the project's retention, as
                    `drop_expired_partitions()` finds it) and a client streams an
                    --export-row CSV from GET /api/analytics/export;
  (3) one worker    worker concurrency 1, nothing else running.

Targets (issue 14): (2) keeps >= 80% of (1)'s rate; the prune takes < 5 s.
docs/scaling.md says what the figures mean.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from ingest import (  # noqa: E402  (bench/ingest.py: the portal, meters, workloads)
    REDIS_URL,
    EndToEnd,
    Workload,
    build_workload,
    django_on,
    drive,
    pause_autovacuum,
    postmaster_pid,
    redis_reachable,
    reset,
    running_portal,
    server_settings,
    warm_up,
)

BENCH_DB = "runlens_bench_load"
TARGET_UNDER_LOAD = 0.8  # issue 14: ingest keeps >= 80% of its rate under a prune and an export
TARGET_PRUNE_S = 5.0


@dataclass
class Phase:
    name: str
    e2e: EndToEnd
    acks_ms: list[float]
    events: int
    side: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.e2e.seconds

    def ack(self, q: float) -> float:
        ordered = sorted(self.acks_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ingest(portal, conn, postmaster, token: str, work: Workload, threads: int) -> Phase:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "gzip",
    }
    acks: list[float] = []

    def send(http_conn: http.client.HTTPConnection, item: tuple[bytes, int]) -> str | None:
        body, lines = item
        started = time.perf_counter()
        status, answer = portal.post(body, headers, http_conn)
        acks.append((time.perf_counter() - started) * 1000)
        if status != 202 or orjson.loads(answer)["accepted"] != lines:
            return f"{status}: {answer[:300]!r}"
        return None

    total = sum(lines for _, lines in work.batches)
    e2e = drive(portal, conn, postmaster, work.batches, send, "runs_event", total, threads)
    return Phase("", e2e, acks, total)


# --- What runs beside ingest in (2) ----------------------------------------------------


def expired_day(keep_days: int) -> date:
    return datetime.now(UTC).date() - timedelta(days=keep_days + 10)


def seed_expired(conn: psycopg.Connection, project_id: int, day: date, events: int) -> None:
    """A day of events past retention, in its own partition, as months of use leave."""
    from runs import partitions

    partitions.create(day)
    start = partitions.bounds(day)[0]
    run_id = conn.execute(
        "INSERT INTO runs_run (project_id, run_id, slug, kind, status, phase, host, exit_clean,"
        " tags, attributes, events_count, errors_count, warnings_count, tokens_in, tokens_out,"
        " cost_usd, last_seq, created, watched)"
        " VALUES (%s, 'expired', 'old', '', 'succeeded', '', '', true, '{}', '{}', %s, 0, 0,"
        " 0, 0, 0, %s, %s, false) RETURNING id",
        [project_id, events, events, start],
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO runs_event (run_id, ts, seq, level, event, phase, message, data,"
        " request_id, trace_id, span_id)"
        " SELECT %s, %s + g * (interval '86 seconds' / 1000), g, 'info', 'tool.call', 'WORKING',"
        " 'pytest -q tests/test_config.py', jsonb_build_object('exit_code', 0, 'i', g),"
        " '', '', '' FROM generate_series(1, %s) g",
        [run_id, start, events],
    )


def seed_metrics(conn: psycopg.Connection, project_id: int, points: int) -> None:
    conn.execute(
        "INSERT INTO runs_runmetric (project_id, run_id, name, value, unit, labels, recorded_at,"
        " source) SELECT %s, NULL, 'duration_ms', (g %% 9000) + 0.5, 'ms', '{}',"
        " now() - g * interval '1 second', 'api' FROM generate_series(1, %s) g",
        [project_id, points],
    )
    conn.execute("VACUUM ANALYZE runs_runmetric")


def prune_beside(result: dict, delay: float) -> threading.Thread:
    def work() -> None:
        from django.db import connection

        from runs.retention import drop_expired_partitions

        time.sleep(delay)
        started = time.perf_counter()
        result["dropped"] = [d.isoformat() for d in drop_expired_partitions()]
        result["prune_s"] = time.perf_counter() - started
        connection.close()

    return threading.Thread(target=work, daemon=True)


def export_beside(port: int, token: str, rows: int, result: dict) -> threading.Thread:
    def work() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        started = time.perf_counter()
        conn.request(
            "GET",
            f"/api/analytics/export?format=csv&limit={rows}",
            headers={"Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        lines = 0
        while chunk := response.read(1 << 20):
            lines += chunk.count(b"\n")
        result["export_status"] = response.status
        result["export_rows"] = lines - 1  # the header
        result["export_s"] = time.perf_counter() - started
        conn.close()

    return threading.Thread(target=work, daemon=True)


# --- Report ----------------------------------------------------------------------------


def report(args, phases: dict[str, Phase], server: dict, expired: int) -> None:
    alone, loaded, single = phases["alone"], phases["loaded"], phases["one worker"]
    print()
    print(f"Runlens ingest under load, {date.today().isoformat()}, {platform.node()}")
    print(
        f"  machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL {server.get('server_version', '?')}"
    )
    print(
        f"  workload: {args.events:,} records in batches of {args.batch:,}, "
        f"{args.threads} client threads; broker {args.broker_name}"
    )
    print()
    print(f"  {'phase':<34}{'seconds':>9}{'events/s':>11}{'ack p50 ms':>12}{'ack p99 ms':>12}")
    for name, phase in phases.items():
        print(
            f"  ({name}){'':<{31 - len(name)}}{phase.e2e.seconds:>9.2f}{phase.rate:>11,.0f}"
            f"{phase.ack(0.5):>12.1f}{phase.ack(0.99):>12.1f}"
        )
    side = loaded.side
    print()
    print(
        f"  beside (2): retention dropped {side.get('dropped')} ({expired:,} events) in "
        f"{side.get('prune_s', float('nan')):.3f} s; the export streamed "
        f"{side.get('export_rows', 0):,} CSV rows (HTTP {side.get('export_status')}) in "
        f"{side.get('export_s', float('nan')):.1f} s"
    )
    ratio = loaded.rate / alone.rate
    verdict = "met" if ratio >= TARGET_UNDER_LOAD else "MISSED"
    print(f"  (2)/(1) = {ratio:5.2f}x   target >= {TARGET_UNDER_LOAD}x   {verdict}")
    prune_ok = side.get("prune_s", 1e9) < TARGET_PRUNE_S
    prune_s = side.get("prune_s", float("nan"))
    print(f"  prune {prune_s:.3f} s   target < 5 s   {'met' if prune_ok else 'MISSED'}")
    print(f"  two workers / one = {alone.rate / single.rate:5.2f}x")
    foreign = {name: phase.e2e.foreign for name, phase in phases.items() if phase.e2e.foreign > 1}
    if foreign:
        print()
        print("  WARNING: the machine was not quiet; these figures are not comparable:")
        for name, cpu in foreign.items():
            print(f"    ({name}): other processes used {cpu:.1f} CPU-s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000, help="records per phase")
    parser.add_argument("--batch", type=int, default=1_000, help="NDJSON lines per request")
    parser.add_argument("--threads", type=int, default=4, help="HTTP client threads")
    parser.add_argument("--expired", type=int, default=1_000_000, help="events retention drops")
    parser.add_argument("--export", type=int, default=1_000_000, help="CSV rows exported")
    parser.add_argument("--keep-db", action="store_true", help=f"keep {BENCH_DB} afterwards")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    print(f"preparing {BENCH_DB} and {args.events:,} records …", flush=True)
    with django_on(BENCH_DB, keep=args.keep_db) as bench_url:
        from runs.models import Project

        work = build_workload(args.events, args.batch)
        with psycopg.connect(bench_url, autocommit=True) as conn:
            server = server_settings(conn)
            postmaster = postmaster_pid(conn)
            pause_autovacuum(conn)
            project = Project.objects.create(name="Bench", slug="bench")
            token = project.create_token("bench")
            args.broker_name = "redis" if redis_reachable() else "filesystem"
            broker = REDIS_URL if args.broker_name == "redis" else "filesystem://"
            phases: dict[str, Phase] = {}
            for name, concurrency in (("alone", 2), ("loaded", 2), ("one worker", 1)):
                reset(conn, runs=True)
                conn.execute("TRUNCATE runs_runmetric")
                side: dict = {}
                extra: list[threading.Thread] = []
                print(f"({name}) …", flush=True)
                with running_portal(
                    url=bench_url,
                    broker=broker,
                    web_workers=2,
                    web_threads=2,
                    concurrency=concurrency,
                ) as portal:
                    warm_up(portal, conn, token, work)  # ends with empty tables
                    if name == "loaded":
                        print("  seeding the expired day and the metric points …", flush=True)
                        day = expired_day(project.retention_max_age_days)
                        seed_expired(conn, project.pk, day, args.expired)
                        seed_metrics(conn, project.pk, args.export)
                        pause_autovacuum(conn)  # the expired day's partition too
                        conn.execute("CHECKPOINT")
                        extra = [
                            prune_beside(side, delay=0.5),
                            export_beside(portal.port, token, args.export, side),
                        ]
                        for thread in extra:
                            thread.start()
                    phase = ingest(portal, conn, postmaster, token, work, args.threads)
                    for thread in extra:
                        thread.join(600)
                phase.name, phase.side = name, side
                phases[name] = phase
        report(args, phases, server, args.expired)
    return 0


if __name__ == "__main__":
    sys.exit(main())
