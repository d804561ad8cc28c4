"""Alerts benchmark: one evaluation round at 1M and 10M events.

    .venv/bin/python bench/alerts.py [--sizes 1000000,10000000] [--rounds 5] [--keep]

For each size, a dedicated database `runlens_bench_alerts` on the server of
`DATABASE_URL` (or the embedded PostgreSQL), migrated by the portal, is seeded with
COPY: 5 projects of 20 slugs each, a run per 100 events over the last 8 days (5%
failed, 1% crashed, some orphaned, a cost each), the events themselves, 1% of them
error-level with their error reports (and 20% more from Sentry and the browser), 200
error groups per project (some regressed), and the per-minute counts the worker
keeps for them: events and errors per project (EventCount), errors per slug and
minute (SlugErrorCount, every slug erring every minute: the worst case), 429s per
minute (RefusalCount); a few pending batches. Then VACUUM ANALYZE.

Rules: every condition on every project, and five slug-scoped rules (error_events,
error_rate_above_baseline, no_runs, cost_over, run_failed) on five slugs of each:
175 rules. They have no channels: the round is measured, not delivery. One warm-up
round (it creates the states), then --rounds timed rounds of `run_round()`, each in
its own transaction as beat runs it; the median and the slowest are printed, with
the statements per round and the slowest rule. Target: under 1 s at 10M events.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
from ingest import configured_url, create_database, drop_database  # bench/ is sys.path[0]

BENCH_DB = "runlens_bench_alerts"
PROJECTS = 5
SLUGS = 20
EVENTS_PER_RUN = 100
DAYS = 8
TARGET_S = 1.0
COPY_CHUNK = 200_000  # lines per write to the COPY


def _t(value) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def line(*values) -> str:
    return "\t".join(_t(v) for v in values) + "\n"


def seed(url: str, events: int, now: datetime) -> dict[str, float]:
    """COPY the world of one size; returns seconds per part."""
    timings = {}
    start = now - timedelta(days=DAYS)
    span = (now - start).total_seconds()
    runs = events // EVENTS_PER_RUN
    t0 = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for p in range(1, PROJECTS + 1):
            cur.execute(
                "INSERT INTO runs_project (id, name, slug, public_key, allowed_origins,"
                " retention_runs_per_slug, retention_max_age_days, created)"
                " VALUES (%s, %s, %s, %s, '', 20, 30, now())",
                [p, f"Bench {p}", f"bench{p}", f"benchkey{p}"],
            )
        columns = (
            "id, project_id, run_id, slug, kind, status, phase, pid, host, started_at,"
            " finished_at, last_heartbeat, last_event_at, exit_clean, exit_code, parent_id,"
            " tags, attributes, events_count, errors_count, warnings_count, tokens_in,"
            " tokens_out, cost_usd, duration_ms, last_seq, created, watched"
        )
        with cur.copy(f"COPY runs_run ({columns}) FROM STDIN") as copy:
            buf = io.StringIO()
            for i in range(1, runs + 1):
                project = i % PROJECTS + 1
                slug = f"org__repo{i // PROJECTS % SLUGS}"
                started = start + timedelta(seconds=span * (i - 1) / runs)
                ended = started + timedelta(minutes=10)
                if i > runs - 20:
                    status = "running"
                elif i % 200 == 7:
                    status = "orphaned"
                elif i % 20 == 3:
                    status = "failed"
                elif i % 100 == 11:
                    status = "crashed"
                else:
                    status = "succeeded"
                done = status in ("failed", "crashed", "succeeded")
                buf.write(
                    line(
                        i,
                        project,
                        f"run-{i}",
                        slug,
                        "run",
                        status,
                        "DONE" if done else "WORKING",
                        1000 + i % 30000,
                        "host",
                        started,
                        ended if done else None,
                        ended,
                        ended,
                        status == "succeeded",
                        1 if status == "failed" else None,
                        None,
                        "[]",
                        "{}",
                        EVENTS_PER_RUN,
                        1,
                        0,
                        0,
                        0,
                        f"{(i % 40) * 0.05:.6f}",
                        600000 if done else None,
                        EVENTS_PER_RUN,
                        started,
                        True,
                    )  # fmt: skip
                )
                if i % COPY_CHUNK == 0:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        cur.execute("SELECT setval(pg_get_serial_sequence('runs_run', 'id'), %s)", [runs])
        conn.commit()
        timings["runs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with cur.copy(
            "COPY runs_event (run_id, ts, seq, level, event, phase, message, data,"
            " request_id, trace_id, span_id) FROM STDIN"
        ) as copy:
            buf = io.StringIO()
            for k in range(events):
                run = k // EVENTS_PER_RUN + 1
                seq = k % EVENTS_PER_RUN + 1
                ts = start + timedelta(seconds=span * k / events)
                level = "error" if k % 100 == 50 else "info"
                buf.write(
                    f"{run}\t{ts.isoformat()}\t{seq}\t{level}\ttool.call\tWORKING\t\t{{}}\t\t\t\n"
                )
                if k % COPY_CHUNK == COPY_CHUNK - 1:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        conn.commit()
        timings["events"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        groups = 200
        with cur.copy(
            "COPY telemetry_errorgroup (id, project_id, fingerprint, title, culprit, level,"
            " source, status, first_seen, last_seen, count, regressed, resolved_at) FROM STDIN"
        ) as copy:
            for g in range(1, groups * PROJECTS + 1):
                status = "resolved" if g % 10 == 0 else "unresolved"
                copy.write(
                    line(
                        g,
                        g % PROJECTS + 1,
                        f"fp{g}",
                        f"Error {g}",
                        "",
                        "error",
                        "event",
                        status,
                        start,
                        now,
                        100,
                        g % 25 == 1,
                        None,
                    )  # fmt: skip
                )
        cur.execute(
            "SELECT setval(pg_get_serial_sequence('telemetry_errorgroup', 'id'), %s)",
            [groups * PROJECTS],
        )
        reports = events // 100 * 12 // 10  # the error-level events, plus 20% from elsewhere
        with cur.copy(
            "COPY telemetry_errorreport (group_id, project_id, source, level, message, error,"
            " stack, context, url, visitor, request_id, run_id, event_seq, received_at,"
            " event_id, release, environment, event) FROM STDIN"
        ) as copy:
            buf = io.StringIO()
            for r in range(reports):
                g = r % (groups * PROJECTS) + 1
                source = ("event", "event", "event", "event", "sentry", "frontend")[r % 6]
                at = start + timedelta(seconds=span * r / reports)
                run = min(runs, int(runs * r / reports) + 1) if source == "event" else None
                buf.write(
                    line(
                        g,
                        g % PROJECTS + 1,
                        source,
                        "error",
                        "boom",
                        "",
                        "",
                        "{}",
                        "",
                        "",
                        "",
                        run,
                        None,
                        at,
                        "",
                        "",
                        "",
                        "{}",
                    )  # fmt: skip
                )
                if r % COPY_CHUNK == COPY_CHUNK - 1:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        conn.commit()
        timings["errors"] = time.perf_counter() - t0

        # The per-minute counts the worker keeps, as it would have kept them.
        t0 = time.perf_counter()
        minutes = DAYS * 24 * 60
        per_minute = max(1, events // (PROJECTS * minutes))
        params = {"start": start, "n": minutes, "per": per_minute, "err": max(1, per_minute // 100)}
        cur.execute(
            "INSERT INTO runs_eventcount (project_id, minute, events, errors)"
            " SELECT p, date_trunc('minute', %(start)s::timestamptz) + m * interval '1 minute',"
            " %(per)s, %(err)s"
            " FROM generate_series(1, 5) p, generate_series(1, %(n)s) m",
            params,
        )
        cur.execute(
            "INSERT INTO telemetry_slugerrorcount (project_id, slug, minute, errors)"
            " SELECT p, 'org__repo' || s,"
            " date_trunc('minute', %(start)s::timestamptz) + m * interval '1 minute', 1"
            " FROM generate_series(1, 5) p, generate_series(0, 19) s,"
            " generate_series(1, %(n)s) m",
            params,
        )
        cur.execute(
            "INSERT INTO telemetry_refusalcount (project_id, minute, refused)"
            " SELECT 1, date_trunc('minute', now()) - m * interval '1 minute', 3"
            " FROM generate_series(0, 1439) m"
        )
        cur.execute(
            "INSERT INTO telemetry_ingestbatch (project_id, kind, received_at, state, attempts,"
            " error, body, params, request_id, summary)"
            " SELECT p, 'events', now() - interval '5 minutes', 'pending', 0, '', '', '{}', '',"
            " '{}' FROM generate_series(1, 5) p, generate_series(1, 10)"
        )
        conn.commit()
        timings["counts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    timings["vacuum"] = time.perf_counter() - t0
    return timings


SLUG_RULES = [
    ("error_events", {"threshold": 50, "window_minutes": 5}),
    ("error_rate_above_baseline", {"threshold": 10}),
    ("no_runs", {"window_minutes": 60}),
    ("cost_over", {"threshold": 5}),
    ("run_failed", {}),
]
PROJECT_RULES = {
    "error_events": {"threshold": 50, "window_minutes": 5},
    "new_error_group": {},
    "error_group_regressed": {},
    "run_orphaned": {},
    "run_failed": {},
    "rate_limited": {"threshold": 10, "window_minutes": 5},
    "cost_over": {"threshold": 20},
    "no_runs": {"window_minutes": 60},
    "ingest_backlog": {"threshold": 60},
    "error_rate_above_baseline": {"threshold": 10},
}


def make_rules(now: datetime) -> int:
    from runs.models import Project
    from telemetry.models import AlertRule

    rules = []
    for project in Project.objects.order_by("id"):
        for condition, fields in PROJECT_RULES.items():
            rules.append(
                AlertRule(
                    name=f"{project.slug} {condition}",
                    project=project,
                    condition=condition,
                    **fields,
                )
            )
        for s in range(5):
            for condition, fields in SLUG_RULES:
                rules.append(
                    AlertRule(
                        name=f"{project.slug} org__repo{s} {condition}",
                        project=project,
                        slug=f"org__repo{s}",
                        condition=condition,
                        **fields,
                    )
                )
    for rule in rules:
        rule.created = now - timedelta(days=DAYS)
        rule.save()
    return len(rules)


def use(name: str) -> None:
    from django.db import connections

    connection = connections["default"]
    connection.close()
    connection.settings_dict["NAME"] = name


def measure(rounds: int) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from telemetry.alerts import conditions
    from telemetry.alerts.evaluation import run_round
    from telemetry.models import AlertRule

    run_round(timezone.now())  # warm-up: creates the states
    times, statements = [], 0
    for _ in range(rounds):
        with CaptureQueriesContext(connection) as queries:
            t0 = time.perf_counter()
            result = run_round(timezone.now())
            times.append(time.perf_counter() - t0)
        statements = len(queries)
        assert result is not None and not result.failed_rules, result
    # The slowest condition, alone, for the slowest-rule figure.
    per_rule = []
    now = timezone.now()
    for rule in AlertRule.objects.select_related("project"):
        t0 = time.perf_counter()
        conditions.CONDITIONS[rule.condition].check(rule, now)
        per_rule.append((time.perf_counter() - t0, rule.name))
    per_rule.sort(reverse=True)
    return {
        "rules": result.rules,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "statements": statements,
        "slowest": per_rule[:3],
    }


def sizes(url: str) -> dict:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM runs_event), (SELECT count(*) FROM runs_run),"
            " (SELECT count(*) FROM telemetry_errorreport),"
            " (SELECT count(*) FROM runs_eventcount),"
            " (SELECT count(*) FROM telemetry_slugerrorcount),"
            " pg_size_pretty((SELECT sum(pg_total_relation_size(relid))"
            " FROM pg_partition_tree('runs_event')))"
        ).fetchone()
    names = ["events", "runs", "reports", "eventcounts", "slugcounts", "events_disk"]
    return dict(zip(names, row, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the last database")
    args = parser.parse_args()
    server = configured_url()
    os.environ["DATABASE_URL"] = server.rsplit("/", 1)[0] + "/" + BENCH_DB
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    print(
        f"# alerts benchmark · {platform.node()} · {os.cpu_count()} CPUs"
        f" · Python {platform.python_version()}"
    )
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        url = create_database(server, BENCH_DB)
        now = datetime.now(UTC)
        timings = seed(url, size, now)
        import django

        django.setup()
        use(BENCH_DB)
        rules = make_rules(now)
        figures = measure(args.rounds)
        counts = sizes(url)
        results.append((size, figures))
        seeded = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        print(
            f"\n{size:,} events ({counts['events_disk']} on disk), {counts['runs']:,} runs, "
            f"{counts['reports']:,} error reports, {counts['eventcounts']:,} EventCount rows, "
            f"{counts['slugcounts']:,} SlugErrorCount rows; seeded in: {seeded}"
        )
        print(
            f"  one round, {rules} rules: median {figures['median_s'] * 1000:.0f} ms, "
            f"slowest {figures['max_s'] * 1000:.0f} ms of {args.rounds}; "
            f"{figures['statements']} statements"
        )
        for seconds, name in figures["slowest"]:
            print(f"  slowest rule: {name}: {seconds * 1000:.1f} ms")
        from django.db import connections

        connections.close_all()
    if not args.keep:
        drop_database(server, BENCH_DB)
    worst = max(f["median_s"] for _, f in results)
    print(f"\ntarget: one round under {TARGET_S:.0f} s: {'met' if worst < TARGET_S else 'MISSED'}")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
