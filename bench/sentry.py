"""Sentry benchmark (issue 12): SDK envelopes to stored, grouped error reports, in one run.

    .venv/bin/python bench/sentry.py [--events N] [--threads T] [--floor-requests M]

On a dedicated database (`runlens_bench_sentry`, on the server of `DATABASE_URL`, or
the embedded PostgreSQL when that is unset), freshly migrated. Before any clock
starts, the real `sentry-sdk`, initialised with the bench project's DSN and a
transport that keeps envelopes instead of sending them, captures N events (varied
exceptions, chained ones, messages at several levels, tags, users, breadcrumbs,
local variables and source context, as the SDK sends by default) and a transaction
with child spans for every tenth event. Each envelope is gzip-compressed as the SDK's
HTTP transport does (level 9). Then, against a real portal (gunicorn + Celery worker,
bench/ingest.py's, with no request rate limit):

  (f) floor      T clients GET /health/live, M requests: the portal's own ceiling for
                 a request that does nothing (no database, no broker); measured before
                 and after (s), the better of the two is the floor;
  (s) sentry     the same T clients POST the envelopes, one a request, to
                 /api/<project id>/envelope/ with X-Sentry-Auth, as SDKs do; the clock
                 runs from the first POST until `count(*) FROM telemetry_errorreport`
                 is N and every spooled batch is stored (transactions included).

Target (issue 12): stored and grouped events/s >= 0.5x the floor. docs/performance.md
says what the figures mean.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import platform
import queue
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from ingest import (  # noqa: E402  (bench/ingest.py: the portal, CPU meters, databases)
    REDIS_URL,
    CpuMeter,
    EndToEnd,
    Timing,
    django_on,
    drive,
    pause_autovacuum,
    postmaster_pid,
    redis_reachable,
    running_portal,
    server_settings,
    wait_stored,
)

BENCH_DB = "runlens_bench_sentry"
TARGET_FLOOR = 0.5  # issue 12: stored and grouped events/s >= 0.5x GET /health/live
TABLES = (
    "telemetry_errorreport, telemetry_errorgroup, telemetry_span, "
    "telemetry_envelopeitemcount, telemetry_ingestbatch"
)


def reset(conn: psycopg.Connection) -> None:
    conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    conn.execute("CHECKPOINT")


# --- Envelopes, made by the real SDK ----------------------------------------------------


@dataclass
class Envelope:
    body: bytes  # gzip, as the SDK's transport sends it
    events: int  # `event` items in it
    size: int  # bytes before compression


class AgentError(Exception):
    pass


# The code an agent's service runs; the SDK reads these frames, their source lines and
# their local variables as it would in production.
def load_config(text: str) -> int:
    return int(text)


def fetch_issue(cache: dict, number: int) -> dict:
    return cache[f"issue-{number}"]


def call_model(attempt: int, timeout: float) -> None:
    raise TimeoutError(f"request to https://api.openai.com/v1/chat timed out after {timeout}s")


def apply_patch(sha: str, hunks: int) -> None:
    try:
        hunks / (hunks - hunks)
    except ZeroDivisionError as exc:
        raise AgentError(f"could not apply patch {sha} ({hunks} hunks)") from exc


def push_branch(branch: str, retries: int) -> None:
    try:
        raise ConnectionError(f"[Errno 111] Connection refused: github.com:443 ({retries})")
    except ConnectionError as exc:
        raise RuntimeError(f"git push origin {branch} failed") from exc


def run_step(rng: random.Random, i: int) -> None:
    """Raise one of the agent's usual failures, with varying values."""
    kind = i % 5
    if kind == 0:
        load_config(f"workers={rng.randint(1, 64)}")
    elif kind == 1:
        fetch_issue({}, rng.randint(1, 5000))
    elif kind == 2:
        call_model(rng.randint(1, 3), rng.choice((30.0, 60.0, 120.0)))
    elif kind == 3:
        apply_patch(f"{rng.getrandbits(160):040x}", rng.randint(1, 40))
    else:
        push_branch(f"agent/fix-{rng.randint(1, 900)}", rng.randint(1, 5))


def make_envelopes(dsn: str, events: int, seed: int) -> list[Envelope]:
    """`events` error events (and a transaction every tenth) captured by sentry-sdk."""
    import sentry_sdk
    from sentry_sdk.transport import Transport

    captured: list = []

    class Capture(Transport):
        def capture_envelope(self, envelope) -> None:
            captured.append(envelope)

    sentry_sdk.init(
        dsn=dsn,
        transport=Capture,
        release="agent@1.4.2",
        environment="production",
        traces_sample_rate=1.0,
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    rng = random.Random(seed)
    levels = ("warning", "info", "error")
    for i in range(events):
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("agent", rng.choice(("Toast", "Shadow", "Furiosa", "Nux")))
            scope.set_tag("repo", f"octocat/repo-{rng.randint(1, 30)}")
            if i % 3 == 0:
                scope.set_tag("run_id", f"run-{rng.randint(1, 200)}")
            scope.set_user({"id": str(rng.randint(1, 500)), "username": f"dev{i % 40}"})
            for step in range(rng.randint(2, 8)):
                sentry_sdk.add_breadcrumb(
                    category=rng.choice(("git", "llm", "tool")),
                    message=f"step {step}: {rng.choice(('clone', 'prompt', 'pytest -q', 'diff'))}",
                    level="info",
                    data={"duration_ms": rng.randint(1, 9000)},
                )
            if i % 7 == 6:
                sentry_sdk.capture_message(
                    f"Deploy {rng.randint(1, 400)} of {rng.choice(('api', 'web'))} failed",
                    level=levels[i % 3],
                )
            else:
                try:
                    run_step(rng, i)
                except Exception:
                    sentry_sdk.capture_exception()
        if i % 10 == 9:
            with sentry_sdk.start_transaction(op="agent.run", name=f"fix issue {i % 50}"):
                for op in ("llm.call", "tool.call", "git.push"):
                    with sentry_sdk.start_span(op=op, name=f"{op} {i % 13}"):
                        pass
    sentry_sdk.flush()
    sentry_sdk.init(dsn=None)
    out = []
    for envelope in captured:
        raw = envelope.serialize()
        count = sum(1 for item in envelope.items if item.type == "event")
        out.append(Envelope(gzip.compress(raw, 9), count, len(raw)))
    if sum(e.events for e in out) != events:
        raise RuntimeError(f"the SDK made {sum(e.events for e in out)} events, not {events}")
    return out


def sdk_headers(public_key: str) -> dict[str, str]:
    """What sentry-sdk's HTTP transport sends with each envelope."""
    import sentry_sdk

    client = f"sentry.python/{sentry_sdk.VERSION}"
    return {
        "Content-Type": "application/x-sentry-envelope",
        "Content-Encoding": "gzip",
        "User-Agent": client,
        "X-Sentry-Auth": (
            f"Sentry sentry_key={public_key}, sentry_version=7, sentry_client={client}"
        ),
    }


# --- Phases ---------------------------------------------------------------------------


def phase_floor(portal, postmaster: int | None, requests: int, threads: int) -> Timing:
    """`requests` GET /health/live from `threads` keep-alive clients: the floor."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(requests):
        todo.put(None)
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
        try:
            while True:
                try:
                    todo.get_nowait()
                except queue.Empty:
                    return
                conn.request("GET", "/health/live")
                response = response_of(conn)
                if response[0] != 200:
                    failures.append(f"{response[0]}: {response[1][:200]!r}")
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            conn.close()

    meter = CpuMeter(
        {"web": portal.pid("web"), "worker": portal.pid("worker"), "postgres": postmaster}
    )
    start = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - start
    cpu, foreign = meter.stop()
    if failures:
        raise RuntimeError(f"/health/live failed: {failures[:3]}\n{portal.logs()}")
    return Timing(seconds, cpu, foreign)


def response_of(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
    response = conn.getresponse()
    return response.status, response.read()


def phase_sentry(
    portal, conn, postmaster, path: str, headers: dict, envelopes: list, total: int, threads: int
) -> EndToEnd:
    def send(http_conn: http.client.HTTPConnection, envelope: Envelope) -> str | None:
        http_conn.request("POST", path, body=envelope.body, headers=headers)
        status, answer = response_of(http_conn)
        if status != 200 or len(orjson.loads(answer).get("id", "")) != 32:
            return f"{status}: {answer[:300]!r}"
        return None

    return drive(portal, conn, postmaster, envelopes, send, "telemetry_errorreport", total, threads)


def warm_up(portal, conn, path: str, headers: dict, envelopes: list[Envelope]) -> None:
    """The first requests and tasks of each process import, connect, prepare: not timed."""
    http_conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
    try:
        for envelope in envelopes:
            http_conn.request("POST", path, body=envelope.body, headers=headers)
            status, answer = response_of(http_conn)
            if status != 200:
                raise RuntimeError(f"warm-up refused: {status} {answer[:300]!r}\n{portal.logs()}")
        for _ in range(200):
            http_conn.request("GET", "/health/live")
            response_of(http_conn)
    finally:
        http_conn.close()
    wait_stored(portal, conn)
    reset(conn)


# --- Report ---------------------------------------------------------------------------


def cpu_line(label: str, n: int, t: Timing) -> str:
    cores = os.cpu_count() or 1
    spent = ", ".join(f"{k} {v / n * 1e3:.2f}" for k, v in t.cpu.items())
    busy = sum(t.cpu.values()) / (t.seconds * cores)
    return f"  {label:40s} {t.seconds:8.2f} {n / t.seconds:10,.0f}   {spent} ({busy:.0%} busy)"


def bound(t: Timing, concurrency: int, web: int) -> str:
    """What held the rate: the machine's cores, or one kind of process's share of them."""
    cores = os.cpu_count() or 1
    used = {k: v / t.seconds for k, v in t.cpu.items()}  # cores used on average
    busy = (sum(t.cpu.values()) + t.foreign) / (t.seconds * cores)
    top = max(used, key=used.get)
    shares = ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
    if busy >= 0.85:
        why = (
            f"CPU: the {cores} cores were {busy:.0%} busy (others included); the largest "
            f"consumer is {top}"
        )
    elif used.get("worker", 0) >= 0.85 * concurrency:
        why = f"the Celery worker: {concurrency} processes, each near a full core"
    elif used.get("web", 0) >= 0.85 * web:
        why = f"the web tier: {web} gunicorn processes, each near a full core"
    else:
        why = f"not CPU ({busy:.0%} of the cores busy): waiting (locks, fsync, round trips)"
    return f"{why}; cores used on average: {shares}"


def report(args, envelopes, floors: list[Timing], sentry: EndToEnd, server, groups: int) -> None:
    cores = os.cpu_count() or 1
    n = args.events
    bodies = sum(len(e.body) for e in envelopes)
    raw = sum(e.size for e in envelopes)
    transactions = len(envelopes) - n
    print()
    print(f"Runlens Sentry benchmark, {date.today()}, {platform.node()}")
    print(
        f"  machine: {cores} cores, Python {platform.python_version()}, "
        f"PostgreSQL {server['server_version']}"
    )
    print(
        f"  workload: {n:,} events and {transactions:,} transactions (3 child spans each) "
        f"from sentry-sdk, one envelope a request, {raw / len(envelopes):,.0f} bytes each "
        f"({bodies / len(envelopes):,.0f} gzip); {args.threads} client threads; gunicorn "
        f"{args.web_workers}x{args.web_threads} threads, celery concurrency "
        f"{args.concurrency}, broker {args.broker_name}; no request rate limit"
    )
    print()
    print(f"  {'path':40s} {'seconds':>8s} {'per s':>10s}   CPU ms per request or event")
    for label, t in zip(
        ("(f) GET /health/live, before", "(f) GET /health/live, after"), floors, strict=True
    ):
        print(cpu_line(label, args.floor_requests, t))
    print(cpu_line("(s) envelopes -> stored, grouped", n, sentry))
    print(f"  {'    all envelopes answered 200':40s} {sentry.acked:8.2f} {n / sentry.acked:10,.0f}")
    print(f"  error groups made: {groups:,}")
    floor = max(args.floor_requests / t.seconds for t in floors)
    stored = n / sentry.seconds
    ratio = stored / floor
    verdict = "met" if ratio >= TARGET_FLOOR else "MISSED"
    print()
    print(f"  acknowledged events/s        {n / sentry.acked:10,.0f}")
    print(f"  stored and grouped events/s  {stored:10,.0f}")
    print(f"  floor (GET /health/live)/s   {floor:10,.0f}")
    print(f"  stored/floor = {ratio:5.2f}x   target >= {TARGET_FLOOR:g}x   {verdict}")
    print()
    print(f"  (s) bound by {bound(sentry, args.concurrency, args.web_workers)}")
    best = min(floors, key=lambda t: t.seconds)
    print(f"  (f) bound by {bound(best, args.concurrency, args.web_workers)}")
    noisy = [
        f"{label}: other processes used {t.foreign:.1f} CPU-s in {t.seconds:.1f} s"
        for label, t in (("(f) before", floors[0]), ("(f) after", floors[1]), ("(s)", sentry))
        if t.foreign > 0.1 * t.seconds * cores
    ]
    if noisy:
        print()
        print("  WARNING: the machine was not quiet; these figures are not comparable:")
        for line in noisy:
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000, help="error events sent")
    parser.add_argument("--floor-requests", type=int, default=10_000, help="GETs per floor run")
    parser.add_argument("--threads", type=int, default=8, help="HTTP client threads")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--keep-db", action="store_true", help=f"keep {BENCH_DB} afterwards")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"preparing {BENCH_DB} and {args.events:,} SDK events …", flush=True)
    with django_on(BENCH_DB, keep=args.keep_db) as bench_url:
        from runs.models import Project

        project = Project.objects.create(name="Bench", slug="bench")
        # The DSN's host is never checked, only its key and project id.
        dsn = f"http://{project.public_key}@127.0.0.1/{project.pk}"
        envelopes = make_envelopes(dsn, args.events, seed=12)
        warm = make_envelopes(dsn, 40, seed=99)
        random.Random(3).shuffle(envelopes)  # transactions among the events, as they come
        path = f"/api/{project.pk}/envelope/"
        headers = sdk_headers(project.public_key)
        with psycopg.connect(bench_url, autocommit=True) as conn:
            server = server_settings(conn)
            postmaster = postmaster_pid(conn)
            pause_autovacuum(conn)
            reset(conn)
            args.broker_name = "redis" if redis_reachable() else "filesystem"
            broker = REDIS_URL if args.broker_name == "redis" else "filesystem://"
            with running_portal(
                url=bench_url,
                broker=broker,
                web_workers=args.web_workers,
                web_threads=args.web_threads,
                concurrency=args.concurrency,
            ) as portal:
                warm_up(portal, conn, path, headers, warm)
                print("(f) GET /health/live …", flush=True)
                floors = [phase_floor(portal, postmaster, args.floor_requests, args.threads)]
                print("(s) Sentry envelopes …", flush=True)
                sentry = phase_sentry(
                    portal, conn, postmaster, path, headers, envelopes, args.events, args.threads
                )
                groups = conn.execute("SELECT count(*) FROM telemetry_errorgroup").fetchone()[0]
                print("(f) GET /health/live, again …", flush=True)
                floors.append(phase_floor(portal, postmaster, args.floor_requests, args.threads))
        report(args, envelopes, floors, sentry, server, groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
