"""Scale benchmark (issue 14, docs/scaling.md): reads at 10M events against 1M, and pruning.

    .venv/bin/python bench/scale.py [--scale 1.0] [--rounds 6] [--per-round 3] [--keep]

Two databases on the server of `DATABASE_URL` (or the embedded PostgreSQL), each
migrated, seeded with COPY and VACUUM ANALYZEd, in the same daily shape: ~10,000
runs a day of 33 events each (bench/reads.py's Gitoma-shaped runs), one error
report per failed run (recurring groups and new ones each day), three metric
points per finished run:

  runlens_bench_scale        30 days ending now: ~10M events;
  runlens_bench_scale_small  the last 3 of those days: ~1M events.

The small database is the large one's last three days, row for row (same run
ids), so the last 24 hours hold the same events in both: what grows is history.
`--scale` multiplies the runs a day (0.1 to try it quickly).

Reads are timed in-process through django.test.Client as a logged-in operator,
in rounds alternating the two databases (bench/reads.py `measure`). Then, on the
large database, pruning: `drop_expired_partitions()` for the oldest days (~1M
events) against the row-by-row delete that retention did before events were
partitioned (chunks of runs, `DELETE … WHERE run_id = ANY`, a commit each, then
VACUUM), of as many events of the following days.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from ingest import configured_url, drop_database  # noqa: E402  (bench/ingest.py)
from reads import (  # noqa: E402  (bench/reads.py)
    Clock,
    _text,
    create_database,
    login,
    measure,
    run_shape,
    seed,
    use,
)

BENCH_DB = "runlens_bench_scale"
SMALL_DB = BENCH_DB + "_small"
RUNS_PER_DAY = 10_000
EVENTS_PER_RUN = 33
DAYS, SMALL_DAYS = 30, 3
TARGET = 1.5
SEARCH_TARGET_MS = 1000
LIVE = 6  # the newest runs are still running
OLD_CHUNK = 200  # runs per DELETE in the row-by-row retention (runs/retention.py CHUNK)


# --- Seeding --------------------------------------------------------------------


def ensure_partitions(db: str, first_day) -> None:
    """Day partitions from the first seeded day on: beat would have made them."""
    from runs import partitions

    use(db)
    today = datetime.now(UTC).date()
    partitions.ensure(today=first_day, ahead=(today - first_day).days + 7)


def seed_errors_and_metrics(url: str, first: int, last: int, clock: Clock) -> tuple[int, int]:
    """One error report per failed run, three metric points per finished run.

    Two thirds of failures fall in 20 groups that recur every day (a flaky tool);
    the rest in 20 groups new each day. Returns (reports, metric points)."""
    groups: dict[str, list] = {}  # fingerprint -> [id, first_seen, last_seen, count]
    reports, points = io.StringIO(), io.StringIO()
    n_reports = n_points = 0
    for i in range(first, last + 1):
        shape = run_shape(i, clock)
        if shape["status"] not in ("succeeded", "failed"):
            continue
        ended = shape["started"] + timedelta(milliseconds=400 * (EVENTS_PER_RUN + 1))
        if shape["status"] == "failed":
            if i % 3:
                fingerprint = f"recurring-{i % 20}"
            else:
                fingerprint = f"day-{shape['started']:%Y%m%d}-{i % 20}"
            group = groups.setdefault(fingerprint, [len(groups) + 1, ended, ended, 0])
            group[2], group[3] = ended, group[3] + 1
            fields = ["event", "error", f"tool failed: {fingerprint}", "ToolFailed", "", {}]
            fields += ["", "", "", 53, ended, group[0], 1, i, "", {}, "", ""]
            reports.write("\t".join(_text(v) for v in fields) + "\n")
            n_reports += 1
        model = "claude-sonnet" if i % 4 else "claude-opus"
        for name, value, unit in (
            ("duration_ms", 400 * EVENTS_PER_RUN + i % 5000, "ms"),
            ("tokens_in", 9000 + i % 3000, "tokens"),
            ("cost_usd", 0.04 + (i % 100) / 1000, "usd"),
        ):
            fields = [name, value, unit, {"model": model}, ended, "api", 1, i, None]
            points.write("\t".join(_text(v) for v in fields) + "\n")
            n_points += 1
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY telemetry_errorgroup (id, fingerprint, title, culprit, level, source, status,"
            " first_seen, last_seen, count, regressed, resolved_at, project_id) FROM STDIN"
        ) as copy:
            for fingerprint, (gid, first_seen, last_seen, count) in groups.items():
                fields = [gid, fingerprint, f"ToolFailed: {fingerprint}", "tool.run_tests"]
                fields += ["error", "event", "unresolved", first_seen, last_seen, count, False]
                fields += [None, 1]
                copy.write("\t".join(_text(v) for v in fields) + "\n")
        with cur.copy(
            "COPY telemetry_errorreport (source, level, message, error, stack, context, url,"
            " visitor, request_id, event_seq, received_at, group_id, project_id, run_id,"
            " environment, event, event_id, release) FROM STDIN"
        ) as copy:
            copy.write(reports.getvalue())
        with cur.copy(
            "COPY runs_runmetric (name, value, unit, labels, recorded_at, source, project_id,"
            " run_id, histogram) FROM STDIN"
        ) as copy:
            copy.write(points.getvalue())
        cur.execute(
            "SELECT setval(pg_get_serial_sequence('telemetry_errorgroup', 'id'), %s)",
            [len(groups) + 1],
        )
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("telemetry_errorgroup", "telemetry_errorreport", "runs_runmetric"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return n_reports, n_points


def event_bytes(url: str) -> tuple[int, int]:
    """(events, bytes on disk of runs_event: every partition, its indexes and TOAST)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM runs_event),"
            " (SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits"
            "  WHERE inhparent = 'runs_event'::regclass)"
        ).fetchone()


# --- Reads ------------------------------------------------------------------------


def reads(clock: Clock, last: int, runs_per_day: int) -> list[tuple[str, str, dict]]:
    """The requests timed in both databases: the same run, window and words."""
    i = last - runs_per_day // 2  # a run of about 12 hours ago, in both databases
    while run_shape(i, clock)["status"] != "succeeded" or i % 11 == 0:
        i -= 1
    from runs.models import Run

    run = Run.objects.get(pk=i)
    rare = f"{i:07x}{11:02x}"  # the sha of the run's one git.commit at k = 11: one event
    day_ago = int(time.time()) - 86_400
    metrics = "/api/analytics/metrics?metricName=duration_ms&aggregation=p95"
    return [
        ("runs list", "/", {}),
        ("run timeline", run.get_absolute_url(), {}),
        ("errors list", "/errors", {}),
        ("metric p95, last 24 h", f"{metrics}&since={day_ago}", {}),
        ("metric p95, last 24 h by slug", f"{metrics}&groupBy=slug&since={day_ago}", {}),
        ("metric p95, all time", metrics, {}),
        ("search 24 h, frequent word", "/api/events/search?q=limited", {}),
        ("search 24 h, rare word", f"/api/events/search?q={rare}", {}),
        ("search page, rare word", f"/search?q={rare}", {}),
    ]


# --- Pruning ----------------------------------------------------------------------


def prune(url: str, keep_days: int) -> dict:
    """Time `drop_expired_partitions()` of the oldest days (~1M events), then the
    row-by-row delete retention did before partitioning, of as many events of the
    days that follow (the dropped ones are gone): DELETE by chunks of runs, a commit
    each, then the VACUUM those deletes leave to do."""
    from django.db import connection
    from django.utils import timezone

    from runs import partitions
    from runs.models import Project
    from runs.retention import drop_expired_partitions

    use(BENCH_DB)
    cutoff = timezone.now() - timedelta(days=keep_days)
    expired = [d for d in partitions.days() if partitions.bounds(d)[1] <= cutoff]
    end = partitions.bounds(expired[-1])[1]
    with psycopg.connect(url) as conn:
        events = conn.execute("SELECT count(*) FROM runs_event WHERE ts < %s", [end]).fetchone()[0]
    Project.objects.update(retention_max_age_days=keep_days)
    connection.close()
    began = time.perf_counter()
    dropped = drop_expired_partitions()
    drop_s = time.perf_counter() - began

    with psycopg.connect(url, autocommit=True) as conn:
        # The runs of the next days, oldest first, until they hold as many events.
        run_ids, total = [], 0
        for run_id, n in conn.execute(
            "SELECT run_id, count(*) FROM runs_event WHERE ts >= %s"
            " GROUP BY run_id ORDER BY run_id",
            [end],
        ):
            if total >= events:
                break
            run_ids.append(run_id)
            total += n
        tables = [
            partitions.name_of(d)
            for d in partitions.days()
            if partitions.bounds(d)[0] < end + timedelta(days=len(dropped) + 1)
        ]
        began = time.perf_counter()
        deleted = 0
        for start in range(0, len(run_ids), OLD_CHUNK):
            with conn.transaction():
                cur = conn.execute(
                    "DELETE FROM runs_event WHERE run_id = ANY(%s)",
                    [run_ids[start : start + OLD_CHUNK]],
                )
                deleted += cur.rowcount
        delete_s = time.perf_counter() - began
        began = time.perf_counter()
        for table in tables:
            conn.execute(f"VACUUM {table}")
        vacuum_s = time.perf_counter() - began
    return {
        "days": len(dropped),
        "events": events,
        "deleted": deleted,
        "drop_s": drop_s,
        "delete_s": delete_s,
        "vacuum_s": vacuum_s,
    }


# --- Report -------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="times ~10,000 runs a day")
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the two sizes")
    parser.add_argument("--per-round", type=int, default=3, help="timed requests per round")
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    parser.add_argument("--no-prune", action="store_true", help="skip the pruning figures")
    args = parser.parse_args()
    runs_per_day = int(RUNS_PER_DAY * args.scale)
    last = DAYS * runs_per_day
    small_first = (DAYS - SMALL_DAYS) * runs_per_day + 1
    now = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(
        start=now - timedelta(days=DAYS, minutes=1),
        every=timedelta(days=1) / runs_per_day,
        live=lambda i: i > last - LIVE,
    )

    server_url = configured_url()
    print(f"creating {SMALL_DB} and {BENCH_DB}, migrating …", flush=True)
    small_url = create_database(server_url, SMALL_DB)
    large_url = create_database(server_url, BENCH_DB)
    os.environ["DATABASE_URL"] = small_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.db import connections
    from django.test import Client

    ok = True
    try:
        figures = {}
        for db, url, first in ((SMALL_DB, small_url, small_first), (BENCH_DB, large_url, 1)):
            began = time.perf_counter()
            ensure_partitions(db, run_shape(first, clock)["started"].date())
            connections.close_all()
            events = seed(url, first, last, EVENTS_PER_RUN, clock=clock)
            n_reports, n_points = seed_errors_and_metrics(url, first, last, clock)
            seconds = time.perf_counter() - began
            counted, size = event_bytes(url)
            figures[db] = {"events": counted, "bytes": size, "reports": n_reports}
            figures[db]["points"] = n_points
            print(
                f"{db}: {last - first + 1:,} runs, {events:,} events, {n_reports:,} error"
                f" reports, {n_points:,} metric points seeded in {seconds:.0f} s;"
                f" events on disk {size / 2**20:,.0f} MiB"
                f" ({size / counted * 1e6 / 2**20:,.0f} MiB per million)",
                flush=True,
            )
        client = Client()
        login(client, (SMALL_DB, BENCH_DB))
        use(SMALL_DB)
        requests = reads(clock, last, runs_per_day)
        results = measure(client, requests, args.rounds, args.per_round, (SMALL_DB, BENCH_DB))
        pruned = None if args.no_prune else prune(large_url, DAYS - SMALL_DAYS)
    finally:
        connections.close_all()
        if not args.keep:
            drop_database(server_url, BENCH_DB, SMALL_DB)

    n = args.rounds * args.per_round
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print()
    print(
        f"Scale benchmark, {platform.node()} ({os.cpu_count()} CPUs, load {' '.join(load)}),"
        f" Python {platform.python_version()}, median of {n} requests per read and size"
    )
    for db in (SMALL_DB, BENCH_DB):
        f = figures[db]
        print(
            f"  {db}: {f['events']:,} events, {f['reports']:,} error reports,"
            f" {f['points']:,} metric points; events {f['bytes'] / f['events'] * 1e6 / 2**20:.0f}"
            " MiB per million on disk (table, indexes, TOAST)"
        )
    print()
    header = f"{'read':32} {'1M ms':>8} {'10M ms':>8} {'ratio':>6} {'queries':>8}  verdict"
    print(header)
    print("-" * len(header))
    for name, _, _ in requests:
        small, large = results[(SMALL_DB, name)], results[(BENCH_DB, name)]
        ratio = large["median"] / small["median"]
        verdicts = []
        if ratio > TARGET:
            verdicts.append(f"OVER {TARGET}x")
        if name.startswith("search") and large["median"] > SEARCH_TARGET_MS:
            verdicts.append("OVER 1 s")
        if "all time" in name:  # reads every point ever recorded: grows with history
            verdicts = ["(all history: grows with it)"]
        else:
            ok &= not verdicts
        queries = f"{small['queries']}/{large['queries']}"
        print(
            f"{name:32} {small['median']:8.1f} {large['median']:8.1f} {ratio:6.2f}"
            f" {queries:>8}  {', '.join(verdicts) or 'ok'}"
        )
    if pruned:
        print()
        print(
            f"pruning {pruned['events']:,} events ({pruned['days']} day partitions):"
            f" drop_expired_partitions() {pruned['drop_s']:.2f} s;"
            f" row-by-row delete of {pruned['deleted']:,} events of the next days"
            f" {pruned['delete_s']:.1f} s + VACUUM {pruned['vacuum_s']:.1f} s"
            f" {'ok' if pruned['drop_s'] < 5 else 'OVER 5 s'}"
        )
        ok &= pruned["drop_s"] < 5
    print()
    print(
        f"targets (each read within {TARGET}x, search < 1 s, prune < 5 s):"
        f" {'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
