"""Ingest benchmark (SPEC §9): run events over HTTP against two baselines, in one run.

    .venv/bin/python bench/ingest.py [--events N] [--batch B] [--threads T]

On a dedicated database (`runlens_bench`, on the same server as the configured
`DATABASE_URL`, or the embedded PostgreSQL when that is unset), freshly migrated,
with the same N Gitoma-shaped records (bench/gitoma.py) for every phase:

  (a) naive ORM   `Event` instances + `Event.objects.bulk_create(batch_size=1000)`
                  into existing runs: what a straightforward Django receiver does;
  (b) raw COPY    the same rows, pre-formatted as COPY text, sent with one psycopg
                  `cursor.copy()` in large writes: the PostgreSQL limit for this
                  table and its indexes;
  (c) end to end  a real portal (gunicorn + a Celery worker + Redis, or the
                  filesystem broker): NDJSON batches, gzip, several client threads,
                  from the first POST until `SELECT count(*) FROM runs_event` is N.

Every phase starts from empty event tables after a CHECKPOINT. The portal's
processes are stopped at the end, also on error or Ctrl-C. Read
docs/performance.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import http.client
import io
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))  # the portal's packages; bench/ itself is sys.path[0]

from gitoma import make_records, ndjson  # noqa: E402

if TYPE_CHECKING:  # Django is set up in main(), once DATABASE_URL names the bench database
    from runs.models import Project
    from telemetry.ingest.records import Record

BENCH_DB = "runlens_bench"
REDIS_URL = "redis://127.0.0.1:6379/15"
ORM_BATCH = 1000
COPY_CHUNK = 4 * 1024 * 1024
COPY_RUNS = 3  # (b) is measured this many times; the median is reported
TARGET_ORM = 5.0  # SPEC §9: (c) >= 5x (a) ...
TARGET_COPY = 0.5  # ... and >= 0.5x (b)


# --- Database ----------------------------------------------------------------


def configured_url() -> str:
    """The server the portal would use: DATABASE_URL, else the embedded PostgreSQL."""
    url = os.environ.get("DATABASE_URL", "")
    if url:
        return url
    from portal.embedded import embedded_database_url

    var_dir = Path(os.environ.get("RUNLENS_VAR_DIR", ROOT / "var"))
    return embedded_database_url(var_dir / "pgdata")


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def create_database(server_url: str, name: str) -> str:
    """A fresh database `name` on the portal's server, migrated by the portal itself;
    returns its URL. Every benchmark makes its own, never touching the portal's."""
    url = with_database(server_url, name)
    # Through the maintenance database: the configured one need not exist yet.
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        check=True,
    )
    return url


def drop_database(server_url: str, *names: str) -> None:
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def django_on(name: str, keep: bool = False) -> Iterator[str]:
    """A fresh migrated database `name` on the configured server, Django set up on it,
    dropped on the way out unless `keep`. Yields its URL."""
    server_url = configured_url()
    bench_url = create_database(server_url, name)
    os.environ["DATABASE_URL"] = bench_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    try:
        yield bench_url
    finally:
        from django.db import connections

        connections.close_all()
        if not keep:
            drop_database(server_url, name)


def wait_stored(portal: Portal, conn: psycopg.Connection, timeout: float = 60) -> None:
    """Until every spooled batch is stored (a warm-up's, before the tables are emptied)."""
    deadline = time.monotonic() + timeout
    while conn.execute(
        "SELECT count(*) FROM telemetry_ingestbatch WHERE state <> 'done'"
    ).fetchone()[0]:
        portal.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up batches not stored after {timeout}s:\n{portal.logs()}")
        time.sleep(0.05)


def pause_autovacuum(conn: psycopg.Connection) -> None:
    """Switch autovacuum off on the benchmark's tables, for every phase alike.

    Its rounds come once a minute, at moments unrelated to the phases: whether one
    lands in the few seconds of (c) was luck, and a table that grows from empty
    passes its thresholds (1,000 inserts, then 10–20% growth) far more often than
    a production table of millions of rows does. When one did, it cost (c) up to
    2 µs of PostgreSQL CPU per event. `--autovacuum` keeps it on.
    """
    # Tables that hold rows: a partitioned table (runs_event) takes no storage
    # parameters, its partitions do.
    tables = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r'"
    ).fetchall()
    off = "autovacuum_enabled = false, toast.autovacuum_enabled = false"
    for (table,) in tables:
        conn.execute(f"ALTER TABLE {table} SET ({off})")


def reset(conn: psycopg.Connection, *, runs: bool) -> None:
    """Empty tables and a checkpoint: no phase pays for the previous one's dirty pages."""
    tables = "runs_event, telemetry_ingestbatch" + (", runs_run" if runs else "")
    conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    conn.execute("CHECKPOINT")


def fingerprint(conn: psycopg.Connection) -> tuple:
    """What was stored, independent of ids: the same rows give the same tuple."""
    return conn.execute(
        """SELECT count(*), count(DISTINCT r.run_id), sum(e.seq), min(e.ts), max(e.ts),
                  sum(length(e.data::text)), sum(length(e.event || e.phase || e.message)),
                  sum(CASE e.level WHEN 'error' THEN 1 ELSE 0 END)
           FROM runs_event e JOIN runs_run r ON r.id = e.run_id"""
    ).fetchone()


def server_settings(conn: psycopg.Connection) -> dict[str, str]:
    names = (
        "server_version",
        "shared_buffers",
        "synchronous_commit",
        "wal_level",
        "max_wal_size",
        "full_page_writes",
        "wal_compression",
    )
    return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}


# --- CPU accounting from /proc --------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_cpu(root: int | None) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants."""
    if root is None:
        return 0.0
    tree, total, todo = _children(), 0.0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, ()))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime + stime, plus cutime + cstime: children that already exited and were
        # reaped (a backend whose connection closed) count for their parent.
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds every process of the machine has used so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by named process trees, by this process, and by everything else.

    "Everything else" is the machine's total minus ours: a busy neighbour (a test
    run, a browser) makes the figures unreliable, and the report says so.
    """

    def __init__(self, roots: dict[str, int | None]):
        self.roots = roots
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        now = {name: tree_cpu(pid) for name, pid in self.roots.items()}
        return {**now, "bench": time.process_time(), "machine": machine_cpu()}

    def stop(self) -> tuple[dict[str, float], float]:
        end = self._read()
        used = {name: end[name] - self.start[name] for name in end}
        machine = used.pop("machine")
        return used, max(0.0, machine - sum(used.values()))


def postmaster_pid(conn: psycopg.Connection) -> int | None:
    """The local server's postmaster, to count the CPU of all its backends."""
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        stat = Path(f"/proc/{backend}/stat").read_text()
    except OSError:
        return None  # a remote server: no CPU figures for it
    return int(stat.rsplit(")", 1)[1].split()[1])


# --- The records --------------------------------------------------------------


@dataclass
class Workload:
    records: list[dict]
    batches: list[tuple[bytes, int]]  # (gzip NDJSON body, lines in it)
    rows: list[Record] = field(default_factory=list)  # as the worker would store them
    raw_bytes: int = 0


def build_workload(events: int, batch: int) -> Workload:
    from telemetry.ingest import records as ingest

    records = make_records(events)
    batches = []
    raw_bytes = 0
    for start in range(0, events, batch):
        body = ndjson(records[start : start + batch])
        raw_bytes += len(body)
        batches.append((gzip.compress(body, 6), min(batch, events - start)))
    # The baselines store exactly what the worker would: judged and scrubbed records.
    pairs, rejected, _ = ingest.parse_body(ndjson(records))
    assert rejected == 0 and len(pairs) == events
    for raw, rec in pairs:
        ingest.scrub(raw, rec)
        rec.fields()  # the ORM baseline gets the data parsed, for free
    return Workload(records, batches, [rec for _, rec in pairs], raw_bytes)


def attach_runs(project: Project, rows: list[Record]) -> None:
    """Create the runs (not timed) and point every row at its run, as the worker would."""
    from runs.models import Run

    first: dict[str, Record] = {}
    for rec in rows:
        first.setdefault(rec.run_id, rec)
    Run.objects.bulk_create(
        [Run(project=project, run_id=k, slug=r.slug, started_at=r.ts) for k, r in first.items()]
    )
    runs = {run.run_id: run for run in Run.objects.filter(project=project)}
    for rec in rows:
        rec.run = runs[rec.run_id]


# --- (a) naive ORM and (b) raw COPY -------------------------------------------------


@dataclass
class Timing:
    seconds: float
    cpu: dict[str, float]  # CPU seconds by process group while the clock ran
    foreign: float  # CPU seconds used by other processes of the machine meanwhile


@contextmanager
def measured(postmaster: int | None, result: list[Timing]) -> Iterator[None]:
    """Wall clock and CPU of this process and of the database server around a block."""
    meter = CpuMeter({"postgres": postmaster})
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    result.append(Timing(seconds, *meter.stop()))


def phase_orm(rows: list[Record]) -> None:
    from runs.models import Event

    Event.objects.bulk_create(
        [
            Event(
                run_id=rec.run.pk,
                ts=rec.ts,
                seq=rec.seq,
                level=rec.level,
                event=rec.event,
                phase=rec.phase,
                message=rec.message,
                data=rec.data,
                request_id=rec.request_id,
                trace_id=rec.trace_id,
                span_id=rec.span_id,
            )
            for rec in rows
        ],
        batch_size=ORM_BATCH,
    )


def phase_copy(url: str, rows: list[Record], postmaster: int | None) -> Timing:
    from telemetry.ingest.store import COPY_EVENTS, copy_rows

    text = copy_rows(rows)  # formatting is the client's work: not timed here
    chunks = [text[i : i + COPY_CHUNK] for i in range(0, len(text), COPY_CHUNK)]
    result: list[Timing] = []
    with psycopg.connect(url) as conn, measured(postmaster, result):
        with conn.cursor() as cursor, cursor.copy(COPY_EVENTS) as copy:
            for chunk in chunks:
                copy.write(chunk)
        conn.commit()
    return result[0]


# --- (c) end to end -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_reachable() -> bool:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
        # Messages left by an interrupted earlier run would be tasks for batch ids
        # that no longer exist: harmless, but they would eat worker time.
        client.delete("celery", "unacked", "unacked_index")
        return True
    except Exception:
        return False


@dataclass
class Portal:
    """gunicorn + a Celery worker on the bench database, stopped whatever happens."""

    url: str
    broker: str
    web_workers: int
    web_threads: int
    concurrency: int
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runlens-bench-")))

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.url,
            "CELERY_BROKER_URL": self.broker,
            # Our own var/ (broker folders, secret): never the dev portal's queue.
            "RUNLENS_VAR_DIR": str(self.tmp),
            "SECRET_KEY": "runlens-bench-not-a-secret",
            "LOG_LEVEL": "WARNING",
            # Throughput, not the per-project request limit, is measured here (the
            # limit's counter query still runs for every request).
            "INGEST_RATE_PER_MINUTE": "0",
        }

    def start(self) -> None:
        py = sys.executable
        commands = {
            "web": [
                py,
                "-m",
                "gunicorn",
                "portal.wsgi",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.web_workers),
                "--threads",
                str(self.web_threads),
                "--timeout",
                "120",
                "--no-control-socket",  # never the running portal's socket
            ],
            "worker": [
                py,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "--loglevel",
                "WARNING",
                "--concurrency",
                str(self.concurrency),
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
        }
        for name, command in commands.items():
            log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            # Own process group: stop() ends the server and every child it forked.
            self.procs[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        """Until the web answers; warm_up() then shows that the worker consumes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"portal not ready after {timeout}s:\n{self.logs()}")
            try:
                if self.post(b"", {"Authorization": "Bearer nope"})[0] == 401:
                    return
            except OSError:
                pass
            time.sleep(0.2)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def post(
        self, body: bytes, headers: dict[str, str], conn: http.client.HTTPConnection | None = None
    ) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", "/api/ingest/events", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            if own:
                conn.close()

    def logs(self) -> str:
        return "".join(f"--- {name} log:\n{self.log(name)}\n" for name in self.procs)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc else None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def running_portal(**kwargs: Any) -> Iterator[Portal]:
    portal = Portal(**kwargs)
    try:
        portal.start()
        yield portal
    finally:
        portal.stop()


def warm_up(portal: Portal, conn: psycopg.Connection, token: str, work: Workload) -> None:
    """A few small batches through the whole path, then empty tables again.

    The first requests and tasks of each process import modules, prepare
    statements and connect to Redis and PostgreSQL: a one-off cost of starting,
    not part of the steady rate this benchmark measures.
    """
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "gzip",
    }
    body = gzip.compress(ndjson(work.records[:200]))
    answers: list[tuple[int, bytes]] = []

    def post() -> None:
        answers.append(portal.post(body, headers))

    posts = [threading.Thread(target=post) for _ in range(4 * portal.web_workers)]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join()
    if any(status != 202 for status, _ in answers) or len(answers) != len(posts):
        raise RuntimeError(f"warm-up refused: {answers[:2]}\n{portal.logs()}")
    deadline = time.monotonic() + 60
    while conn.execute(
        "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FROM telemetry_ingestbatch"
    ).fetchone() != (len(posts), len(posts)):
        portal.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up batches not stored after 60s:\n{portal.logs()}")
        time.sleep(0.05)
    reset(conn, runs=True)


@dataclass
class EndToEnd(Timing):
    acked: float = 0.0  # first POST -> last 202; `seconds`: first POST -> count(*) = N


def drive(
    portal: Portal,
    conn: psycopg.Connection,
    postmaster: int | None,
    items: list,
    send: Callable[[http.client.HTTPConnection, Any], str | None],
    table: str,
    total: int,
    threads: int,
) -> EndToEnd:
    """POST `items` from `threads` clients and time the first POST to the moment
    `SELECT count(*) FROM <table>` reaches `total`. `send` posts one item on a client's
    connection and returns what went wrong, or None (bench/otlp.py uses it too)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    failures: list[str] = []
    acked_at: list[float] = []

    def client() -> None:
        http_conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=120)
        try:
            while True:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                error = send(http_conn, item)
                if error:
                    failures.append(error)
                acked_at.append(time.perf_counter())
        except Exception as exc:  # reported below; the main thread must not wait forever
            failures.append(repr(exc))
        finally:
            http_conn.close()

    meter = CpuMeter(
        {"web": portal.pid("web"), "worker": portal.pid("worker"), "postgres": postmaster}
    )
    start = time.perf_counter()
    pool = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    deadline = start + max(120.0, total / 500)
    while True:
        # The cheap spool check decides when the count(*) is worth running; the
        # clock stops at the count(*) that sees every row.
        time.sleep(0.02)
        if failures:
            raise RuntimeError(f"ingest failed: {failures[:3]}\n{portal.logs()}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out:\n{portal.logs()}")
        if len(acked_at) < len(items):
            continue
        pending, failed = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'pending'),"
            " count(*) FILTER (WHERE state = 'failed') FROM telemetry_ingestbatch"
        ).fetchone()
        if failed:
            raise RuntimeError(f"{failed} batches failed:\n{portal.logs()}")
        if pending:
            continue
        if conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= total:
            seconds = time.perf_counter() - start
            break
    cpu, foreign = meter.stop()
    for thread in pool:
        thread.join()
    return EndToEnd(seconds, cpu, foreign, acked=max(acked_at) - start)


def phase_http(
    portal: Portal,
    conn: psycopg.Connection,
    postmaster: int | None,
    token: str,
    work: Workload,
    threads: int,
) -> EndToEnd:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "gzip",
    }

    def send(http_conn: http.client.HTTPConnection, item: tuple[bytes, int]) -> str | None:
        body, lines = item
        status, answer = portal.post(body, headers, http_conn)
        if status != 202 or orjson.loads(answer)["accepted"] != lines:
            return f"{status}: {answer[:300]!r}"
        return None

    total = sum(lines for _, lines in work.batches)
    return drive(portal, conn, postmaster, work.batches, send, "runs_event", total, threads)


# --- Where the time goes, in process -----------------------------------------------


def stage_costs(work: Workload, sample: int) -> list[tuple[str, float]]:
    """Microseconds per record of each step of the request and the worker, one core.

    The same functions the portal runs, with the collector paused as they run it;
    the best of three runs, as this process has the machine to itself only mostly.
    """
    from portal.http import read_body
    from runs.models import Run
    from telemetry.ingest.pipeline import gc_paused
    from telemetry.ingest.records import judge_body, parse_body, scrub
    from telemetry.ingest.store import copy_rows
    from telemetry.models import pack_body, unpack_body

    body = ndjson(work.records[:sample])
    gz = gzip.compress(body, 6)
    out = []

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        best = float("inf")
        for _ in range(3):
            gc.collect()
            with gc_paused():
                start = time.perf_counter()
                result = fn()
                best = min(best, time.perf_counter() - start)
        out.append((label, best / sample * 1e6))
        return result

    raw: list[bytes] = []
    timed("request: gunzip (read_body)", lambda: read_body(io.BytesIO(gz), "gzip", 1 << 30))
    read_body(io.BytesIO(gz), "gzip", 1 << 30, raw)
    timed("request: judge lines (judge_body)", lambda: judge_body(body))
    spooled = timed("request: spool (gzip kept as sent)", lambda: pack_body(body, "gzip", raw))
    timed("worker: unspool (gunzip)", lambda: unpack_body(spooled))

    pairs = timed("worker: parse_body (with the body scan)", lambda: parse_body(body))[0]
    timed("worker: scrub", lambda: [scrub(raw_line, rec) for raw_line, rec in pairs])
    rows = [rec for _, rec in pairs]
    runs: dict[str, Run] = {}
    for rec in rows:
        if rec.run_id not in runs:
            runs[rec.run_id] = Run(id=len(runs) + 1)
        rec.run = runs[rec.run_id]
    timed("worker: copy_rows (COPY text)", lambda: copy_rows(rows))
    return out


# --- Report ----------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    work: Workload,
    a: Timing,
    b: Timing,
    c: EndToEnd,
    costs: list[tuple[str, float]],
    server: dict[str, str],
    fps: dict[str, tuple],
) -> None:
    n = args.events
    rate_a, rate_b, rate_c = n / a.seconds, n / b.seconds, n / c.seconds
    ratio_a, ratio_b = rate_c / rate_a, rate_c / rate_b
    cores = os.cpu_count() or 1
    print()
    print(f"Runlens ingest benchmark, {date.today()}, {platform.node()}")
    print(
        f"  machine: {cores} cores, Python {platform.python_version()}, "
        f"PostgreSQL {server['server_version']}"
    )
    print("  server: " + ", ".join(f"{k}={v}" for k, v in server.items() if k != "server_version"))
    print(
        f"  workload: {n:,} events in {len({r['run_id'] for r in work.records}):,} runs, "
        f"{work.raw_bytes / n:.0f} bytes/line NDJSON; batches of {args.batch:,} lines, gzip; "
        f"{args.threads} client threads; gunicorn {args.web_workers}x{args.web_threads} threads, "
        f"celery concurrency {args.concurrency}, broker {args.broker_name}; "
        f"autovacuum {'on' if args.autovacuum else 'off'} on the bench's tables"
    )
    print()
    print(f"  {'path':42s} {'seconds':>8s} {'events/s':>10s}   CPU s per 100k events")
    rows = [
        ("(a) naive ORM bulk_create (batch 1000)", a),
        ("(b) raw COPY, pre-formatted (median)", b),
        ("(c) HTTP NDJSON -> queryable rows", c),
    ]
    noisy = []
    for label, t in rows:
        spent = ", ".join(f"{k} {v / n * 1e5:.2f}" for k, v in t.cpu.items())
        busy = sum(t.cpu.values()) / (t.seconds * cores)
        print(f"  {label:42s} {t.seconds:8.2f} {n / t.seconds:10,.0f}   {spent} ({busy:.0%} busy)")
        if t.foreign > 0.1 * t.seconds * cores:
            noisy.append(f"{label[:3]}: other processes used {t.foreign:.1f} CPU-s")
    print(f"  {'    all (c) requests answered 202':42s} {c.acked:8.2f} {n / c.acked:10,.0f}")
    print(f"  (b) runs: {', '.join(f'{rate:,.0f}' for rate in args.copy_rates)} rows/s")
    print()
    for name, ratio, target in (
        ("(c)/(a)", ratio_a, TARGET_ORM),
        ("(c)/(b)", ratio_b, TARGET_COPY),
    ):
        verdict = "met" if ratio >= target else "MISSED"
        print(f"  {name} = {ratio:5.2f}x   target >= {target:g}x   {verdict}")
    print()
    print("  in-process cost per record (one core, µs):")
    for label, micros in costs:
        print(f"    {label:38s} {micros:6.2f}")
    if noisy:
        print()
        print("  WARNING: the machine was not quiet; these figures are not comparable:")
        for line in noisy:
            print(f"    {line}")
    same = len(set(fps.values())) == 1
    print()
    print(f"  stored rows identical in (a), (b), (c): {'yes' if same else 'NO'}")
    if not same:
        for name, fp in fps.items():
            print(f"    {name}: {fp}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000, help="records per phase")
    parser.add_argument("--batch", type=int, default=5_000, help="NDJSON lines per request")
    parser.add_argument("--threads", type=int, default=4, help="HTTP client threads")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--keep-db", action="store_true", help=f"keep {BENCH_DB} afterwards")
    parser.add_argument(
        "--autovacuum", action="store_true", help="leave autovacuum on for the bench's tables"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    print(f"preparing {BENCH_DB} and {args.events:,} records …", flush=True)
    with django_on(BENCH_DB, keep=args.keep_db) as bench_url:
        from runs.models import Project

        work = build_workload(args.events, args.batch)
        with psycopg.connect(bench_url, autocommit=True) as conn:
            server = server_settings(conn)
            postmaster = postmaster_pid(conn)
            if not args.autovacuum:
                pause_autovacuum(conn)
            project = Project.objects.create(name="Bench", slug="bench")
            fps: dict[str, tuple] = {}
            timings: list[Timing] = []

            reset(conn, runs=True)
            attach_runs(project, work.rows)
            print("(a) naive ORM …", flush=True)
            with measured(postmaster, timings):
                phase_orm(work.rows)
            fps["a"] = fingerprint(conn)

            # (b) is the shortest phase and the noisiest (2.4–4 s for the same rows on
            # this VM): the median of COPY_RUNS runs, each from empty tables.
            copies = []
            for number in range(1, COPY_RUNS + 1):
                reset(conn, runs=False)
                print(f"(b) raw COPY, run {number} of {COPY_RUNS} …", flush=True)
                copies.append(phase_copy(bench_url, work.rows, postmaster))
                fps["b"] = fingerprint(conn)
            args.copy_rates = sorted(args.events / t.seconds for t in copies)
            timings.append(sorted(copies, key=lambda t: t.seconds)[COPY_RUNS // 2])

            reset(conn, runs=True)
            token = project.create_token("bench")
            args.broker_name = "redis" if redis_reachable() else "filesystem"
            broker = REDIS_URL if args.broker_name == "redis" else "filesystem://"
            print(f"(c) end to end (broker: {args.broker_name}) …", flush=True)
            with running_portal(
                url=bench_url,
                broker=broker,
                web_workers=args.web_workers,
                web_threads=args.web_threads,
                concurrency=args.concurrency,
            ) as portal:
                warm_up(portal, conn, token, work)
                e2e = phase_http(portal, conn, postmaster, token, work, args.threads)
            fps["c"] = fingerprint(conn)
        costs = stage_costs(work, min(args.events, 20_000))
        report(args, work, timings[0], timings[1], e2e, costs, server, fps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
