"""Reads benchmark (SPEC §9): server time of the run pages at two table sizes.

    .venv/bin/python bench/reads.py [--runs 10000] [--events-per-run 105] [--rounds 10] [--keep]

Two dedicated databases on the same server as the configured `DATABASE_URL` (or
the embedded PostgreSQL when that is unset), each migrated with `manage.py
migrate`, seeded with COPY and VACUUM ANALYZEd:

  runlens_bench_reads        --runs runs (default 10,000) and their events (1.05M);
  runlens_bench_reads_small  the first tenth of the same runs and events.

Pages are requested in-process through django.test.Client as a logged-in operator
(middleware, view, queries, template: the server's whole share of a request, no
network), for the same runs in both databases. Measurements alternate between the
two databases in rounds, so a burst of other work on the machine weighs on both
alike. Each figure is the median of all timed requests after warm-up. The target
(docs/performance-reads.md) is large / small <= 1.5 for every page.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))  # the portal's packages; bench/ itself is sys.path[0]

from ingest import (  # noqa: E402  (bench/ingest.py)
    configured_url,
    drop_database,
)
from ingest import create_database as create_empty_database  # noqa: E402

BENCH_DB = "runlens_bench_reads"
SMALL_DB = BENCH_DB + "_small"
TARGET = 1.5
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
EVERY = timedelta(seconds=20)  # a run starts every EVERY from START
COPY_WRITE = 8 * 1024 * 1024  # bytes of events per COPY write
CONCURRENT = 16  # runs whose events interleave on disk, as parallel agents' do


# --- Database ----------------------------------------------------------------


def create_database(server_url: str, name: str) -> str:
    """A fresh migrated database with the one project the seeds use; returns its URL."""
    url = create_empty_database(server_url, name)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO runs_project (id, name, slug, public_key, allowed_origins,"
            " retention_runs_per_slug, retention_max_age_days, created)"
            " VALUES (1, 'Bench', 'bench', 'benchkey', '', 20, 30, now())"
        )
    return url


def drop_databases(server_url: str) -> None:
    drop_database(server_url, BENCH_DB, SMALL_DB)


# --- Seeding -------------------------------------------------------------------

PHASES = ["ANALYZING", "PLANNING", "WORKING", "PR_OPEN"]
TOOLS = ["tool.read_file", "tool.write_file", "tool.run_tests", "tool.grep"]


def fixed_few_live(i: int) -> bool:
    """A fixed few live runs, whatever the table size."""
    return i % 100 == 99 and i < 1000


@dataclass(frozen=True)
class Clock:
    """When the seeded runs start (run i at start + i × every) and which stay live."""

    start: datetime = START
    every: timedelta = EVERY
    live: Callable[[int], bool] = fixed_few_live


def run_shape(i: int, clock: Clock = Clock()) -> dict:
    """Run number i (1-based): its slug, status and timing. Deterministic."""
    started = clock.start + clock.every * i
    if clock.live(i):
        status = "running"
    elif i % 500 == 250:
        status = "orphaned"
    elif i % 7 == 3:
        status = "failed"
    else:
        status = "succeeded"
    return {
        "run_id": f"org{i % 4}__repo{i % 20}/{started:%Y-%m-%dT%H-%M-%S}-{i}",
        "slug": f"org{i % 4}__repo{i % 20}",  # 20 slugs: full pages at both sizes
        "status": status,
        "started": started,
    }


def run_events(i: int, per_run: int, clock: Clock = Clock()) -> list[tuple]:
    """(seq, ts, level, event, phase, message, data) rows of run i, Gitoma-shaped."""
    shape = run_shape(i, clock)
    t0 = shape["started"]
    rows = [(1, t0, "info", "run.begin", "", "", {"command": "run", "tags": ["bench"]})]
    finishes = shape["status"] not in ("running", "orphaned")
    middle = per_run - (2 if finishes else 1)
    starts = {1: 0, middle // 4: 1, middle // 2: 2, 3 * middle // 4: 3}  # phase boundaries
    phase = PHASES[0]
    for k in range(1, middle + 1):
        seq = k + 1
        ts = t0 + timedelta(milliseconds=400 * seq)
        if k in starts:
            phase = PHASES[starts[k]]
            rows.append((seq, ts, "info", "phase.start", phase, "", {"phase": phase}))
        elif k % 3 == 0:
            data = {"model": "claude-sonnet", "tokens_in": 900 + k, "tokens_out": 120}
            rows.append((seq, ts, "info", "llm.call", phase, "", {**data, "cost_usd": 0.004}))
        elif k % 17 == 0:
            rows.append((seq, ts, "warn", "llm.retry", phase, "rate limited", {"attempt": 2}))
        elif k % 53 == 0 and shape["status"] == "failed":
            rows.append((seq, ts, "error", "tool.failed", phase, "exit status 1", {"code": 1}))
        elif k % 11 == 0:
            rows.append((seq, ts, "info", "git.commit", phase, "", {"sha": f"{i:07x}{k:02x}"}))
        else:
            tool = TOOLS[k % len(TOOLS)]
            rows.append((seq, ts, "info", tool, phase, "", {"path": f"src/mod{k % 40}.py"}))
    if finishes:
        end = t0 + timedelta(milliseconds=400 * (per_run + 1))
        code = 1 if shape["status"] == "failed" else 0
        rows.append((per_run, end, "info", "run.exit_clean", "", "", {"exit_code": code}))
    return rows


def _text(value) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode().replace("\\", "\\\\")
    return str(value)


def seed(
    url: str, first: int, last: int, per_run: int, project_id: int = 1, clock: Clock = Clock()
) -> int:
    """COPY runs first..last and their events; counters agree with the events.

    Runs and events stream through two connections at once, a group of runs at a
    time, so ten million events never sit in memory."""
    now = datetime.now(UTC)
    events_total = 0
    run_columns = (
        "id, project_id, run_id, slug, kind, status, phase, pid, host, started_at,"
        " finished_at, last_heartbeat, last_event_at, exit_clean, exit_code, parent_id,"
        " tags, attributes, events_count, errors_count, warnings_count, tokens_in,"
        " tokens_out, cost_usd, duration_ms, last_seq, created"
    )
    event_columns = (
        "run_id, ts, seq, level, event, phase, message, data, request_id, trace_id, span_id"
    )
    with (
        psycopg.connect(url) as runs_conn,
        psycopg.connect(url) as events_conn,
        runs_conn.cursor() as runs_cur,
        events_conn.cursor() as events_cur,
        runs_cur.copy(f"COPY runs_run ({run_columns}) FROM STDIN") as run_copy,
        events_cur.copy(f"COPY runs_event ({event_columns}) FROM STDIN") as event_copy,
    ):
        run_lines, event_lines = io.StringIO(), io.StringIO()
        for group in range(first, last + 1, CONCURRENT):
            members = range(group, min(group + CONCURRENT, last + 1))
            per = {i: run_events(i, per_run, clock) for i in members}
            for i, rows in per.items():
                run_lines.write(
                    "\t".join(_text(v) for v in run_fields(i, rows, project_id, now, clock)) + "\n"
                )
            # Interleave the group's events by position: parallel agents write in turns.
            for k in range(per_run):
                for i, rows in per.items():
                    if k < len(rows):
                        seq, ts, level, event, phase, message, data = rows[k]
                        event_lines.write(
                            f"{i}\t{ts.isoformat()}\t{seq}\t{level}\t{event}\t{phase}\t{message}"
                            f"\t{_text(data)}\t\t\t\n"
                        )
                        events_total += 1
            if event_lines.tell() > COPY_WRITE:
                run_copy.write(run_lines.getvalue())
                event_copy.write(event_lines.getvalue())
                run_lines, event_lines = io.StringIO(), io.StringIO()
        run_copy.write(run_lines.getvalue())
        event_copy.write(event_lines.getvalue())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setval(pg_get_serial_sequence('runs_run', 'id'), %s)", [last])
        conn.execute("VACUUM ANALYZE runs_run")
        conn.execute("VACUUM ANALYZE runs_event")
    return events_total


def run_fields(i: int, rows: list[tuple], project_id: int, now: datetime, clock: Clock) -> list:
    """The runs_run columns of run i, its counters summed from its events."""
    shape = run_shape(i, clock)
    finished = shape["status"] in ("succeeded", "failed")
    last_ts = rows[-1][1]
    llm = [r for r in rows if r[3] == "llm.call"]
    return [
        i,  # id, fixed so events can name it
        project_id,
        shape["run_id"],
        shape["slug"],
        "run",
        shape["status"],
        "DONE" if finished else rows[-1][4] or "WORKING",
        10_000 + i % 30_000,
        f"host-{i % 8}",
        shape["started"],
        last_ts if finished else None,
        now if shape["status"] == "running" else last_ts,
        last_ts,
        finished,
        (1 if shape["status"] == "failed" else 0) if finished else None,
        None,
        ["bench"],
        {"work_rig": f"rig-{i % 5}"},
        len(rows),
        sum(1 for r in rows if r[2] == "error"),
        sum(1 for r in rows if r[2] == "warn"),
        sum(r[6]["tokens_in"] for r in llm),
        sum(r[6]["tokens_out"] for r in llm),
        f"{0.004 * len(llm):.6f}",
        int((last_ts - shape["started"]).total_seconds() * 1000) if finished else None,
        rows[-1][0],
        shape["started"],
    ]


def sizes(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM runs_run), (SELECT count(*) FROM runs_event),"
            " pg_size_pretty((SELECT sum(pg_total_relation_size(relid))"
            " FROM pg_partition_tree('runs_event')))"
        ).fetchone()
    return {"runs": f"{row[0]:,}", "events": f"{row[1]:,}", "events on disk": row[2]}


# --- Measuring -------------------------------------------------------------------


def pages(small_runs: int) -> list[tuple[str, str, dict]]:
    """The requests timed at both sizes: the same runs, all inside the small set."""
    from runs.models import Run

    finished = Run.objects.get(pk=small_runs // 2 + 1)  # a finished run mid-table
    live = Run.objects.filter(status="running").order_by("-pk").first()
    poll = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "timeline-next"}
    poll["HTTP_HX_TRIGGER"] = "timeline-next"
    return [
        ("runs list (page)", "/", {}),
        ("runs list (htmx refresh)", "/", {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "runs"}),
        ("runs list, slug filter", f"/?slug={finished.slug}", {}),
        ("runs list, status=failed", "/?status=failed", {}),
        ("run timeline (page)", finished.get_absolute_url(), {}),
        ("run timeline, filter llm.", finished.get_absolute_url() + "?filter=llm.", {}),
        ("live timeline poll", f"{live.get_absolute_url()}?after={live.last_seq}", poll),
    ]


def use(name: str) -> None:
    """Point the default connection at another database (closed, reopened on next use)."""
    from django.db import connections

    connection = connections["default"]
    connection.close()
    connection.settings_dict["NAME"] = name


def login(client, databases: tuple[str, str] = (SMALL_DB, BENCH_DB)) -> None:
    """The same operator in both databases: one password hash, a signed-cookie session."""
    from django.conf import settings
    from django.contrib.auth.models import User

    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    use(databases[0])
    user = User.objects.create_user("bench", password="not-used-bench")
    use(databases[1])
    User.objects.create(pk=user.pk, username=user.username, password=user.password)
    client.force_login(user)


def measure(
    client, requests, rounds: int, per_round: int, databases: tuple[str, str] = (SMALL_DB, BENCH_DB)
) -> dict[tuple[str, str], dict]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], dict] = {}
    for round_no in range(rounds):
        for db in databases if round_no % 2 == 0 else databases[::-1]:
            use(db)
            for name, url, headers in requests:
                for _ in range(2):  # warm up: connection, caches, plans
                    assert client.get(url, **headers).status_code == 200, (db, url)
                for _ in range(per_round):
                    started = time.perf_counter()
                    response = client.get(url, **headers)
                    _ = response.content
                    times.setdefault((db, name), []).append((time.perf_counter() - started) * 1000)
                if round_no == 0:
                    with CaptureQueriesContext(connection) as queries:
                        response = client.get(url, **headers)
                    results[(db, name)] = {"queries": len(queries), "bytes": len(response.content)}
    for key, values in times.items():
        results[key].update(median=statistics.median(values), min=min(values), n=len(values))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--events-per-run", type=int, default=105)
    parser.add_argument("--rounds", type=int, default=10, help="alternations of the two sizes")
    parser.add_argument("--per-round", type=int, default=5, help="timed requests per round")
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = parser.parse_args()
    small_runs = args.runs // 10

    server_url = configured_url()
    print(f"creating {SMALL_DB} and {BENCH_DB}, migrating …", flush=True)
    small_url = create_database(server_url, SMALL_DB)
    large_url = create_database(server_url, BENCH_DB)
    os.environ["DATABASE_URL"] = small_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.test import Client

    try:
        began = time.perf_counter()
        small_events = seed(small_url, 1, small_runs, args.events_per_run)
        large_events = seed(large_url, 1, args.runs, args.events_per_run)
        print(
            f"seeded {small_events + large_events:,} events with COPY in "
            f"{time.perf_counter() - began:.1f} s",
            flush=True,
        )
        client = Client()
        login(client)
        use(SMALL_DB)
        requests = pages(small_runs)
        results = measure(client, requests, args.rounds, args.per_round)
        small_sizes, large_sizes = sizes(small_url), sizes(large_url)
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_databases(server_url)

    n = args.rounds * args.per_round
    print()
    print(
        f"Reads benchmark, {platform.node()} ({os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}, median of {n} requests per page and size"
    )
    print(f"  small: {small_sizes}")
    print(f"  large: {large_sizes}")
    print()
    header = f"{'page':30} {'small ms':>9} {'large ms':>9} {'ratio':>6} {'queries':>8}  verdict"
    print(header)
    print("-" * len(header))
    ok = True
    for name, _, _ in requests:
        small, large = results[(SMALL_DB, name)], results[(BENCH_DB, name)]
        ratio = large["median"] / small["median"]
        passed = ratio <= TARGET
        ok &= passed
        queries = f"{small['queries']}/{large['queries']}"
        verdict = "ok" if passed else f"OVER {TARGET}x"
        print(
            f"{name:30} {small['median']:9.2f} {large['median']:9.2f} {ratio:6.2f} "
            f"{queries:>8}  {verdict}"
        )
    print()
    print(f"target: every page within {TARGET}x at 10x the rows: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
