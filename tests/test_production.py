"""The production configuration, as a deployment runs it: `make run` with
`DATABASE_URL` and a real broker, from a virtualenv built from requirements.txt
alone.

The rest of the suite runs in the development virtualenv, where pytest and the
tooling bring packages of their own. That hid a crash: kombu's Redis transport
imports `packaging`, which only pytest installed, so `make run` with
`CELERY_BROKER_URL=redis://…` died at start on a fresh clone (issue 11).

The runtime virtualenv is built once per content of requirements.txt (and
Python version) under var/venv-runtime/, from PyPI only, never prompting.
Without the local PostgreSQL or a broker the tests skip, except under CI=true,
where a skip would hide exactly what they are here to prove.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import ndjson, record, redis_url

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
RUNTIME_VENVS = ROOT / "var" / "venv-runtime"
PYPI = "https://pypi.org/simple"

pytestmark = pytest.mark.worker  # real processes and brokers, like tests/test_worker.py

# The server where each test run creates (and drops) a fresh database.
POSTGRES_URL = os.environ.get(
    "TEST_PRODUCTION_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Redis database 12 (another per test process, tests.conftest.redis_url): 11, 13 and 14
# belong to other tests, 15 to the benchmarks.
BROKERS = {
    "redis": os.environ.get("TEST_PRODUCTION_REDIS_URL") or redis_url(12),
    "amqp": os.environ.get("TEST_PRODUCTION_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "amqp": 5672}

# What the child processes inherit: enough to run and to reach PyPI (proxies,
# certificates, pip's cache), nothing of the test process's Django or pip setup
# (DJANGO_SETTINGS_MODULE, PIP_FIND_LINKS, extra indexes, a virtualenv's paths).
PASSED_THROUGH = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "PIP_CACHE_DIR",
    "PIP_CERT",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)

# Imports every module of the three apps, so that a module needing a package the
# serve run does not touch (a management command, a rarely used view) fails here.
IMPORT_EVERYTHING = """
import importlib, os, pkgutil, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup()
failed = []
for name in ("portal", "runs", "telemetry"):
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            failed.append(f"{module.name}: {exc!r}")
if failed:
    raise SystemExit("cannot import:\\n" + "\\n".join(failed))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def require(service: str, url: str) -> None:
    """Skip when a local service is down; under CI that is a failure, not a skip."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[parts.scheme]
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        message = f"{service} is not reachable at {host}:{port} ({exc}); .ci/run starts it"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def run(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    """Run a command to completion; fail with its whole output if it does not succeed."""
    try:
        done = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        pytest.fail(f"{what} took more than {timeout:.0f} s:\n{output}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} exited with {done.returncode}:\n{done.stdout}", pytrace=False)
    return done.stdout


def build_runtime_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
    env = clean_env(
        # No pip.conf and no PIP_* of the machine: PyPI only, as a fresh clone gets it.
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "--quiet"]
    install += ["--index-url", PYPI, "--timeout", "30", "-r", str(REQUIREMENTS)]
    run(install, env, 600, "pip install -r requirements.txt (PyPI only)")


@pytest.fixture(scope="module")
def runtime_python() -> Path:
    """python of a virtualenv holding requirements.txt and nothing else."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = RUNTIME_VENVS / key
    RUNTIME_VENVS.mkdir(parents=True, exist_ok=True)
    # A lock, not a rename: a virtualenv does not survive being moved, and two
    # pytest processes (xdist, two checkouts' runs) may want it at once.
    with open(RUNTIME_VENVS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            build_runtime_venv(venv)
            (venv / ".complete").touch()
            for old in RUNTIME_VENVS.iterdir():
                if old.is_dir() and old != venv:
                    shutil.rmtree(old, ignore_errors=True)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def fresh_database_url() -> Iterator[str]:
    require("PostgreSQL", POSTGRES_URL)
    name = f"rl_production_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlsplit(POSTGRES_URL)._replace(path="/" + name).geturl()
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def deployment(runtime_python, fresh_database_url, tmp_path_factory) -> dict:
    """`make setup` on a fresh database, then a project and its token."""
    env = clean_env(
        DATABASE_URL=fresh_database_url,
        RUNLENS_VAR_DIR=str(tmp_path_factory.mktemp("var")),
    )
    py = str(runtime_python)
    run([py, "-c", IMPORT_EVERYTHING], env, 60, "importing every module of portal/runs/telemetry")
    run([py, "manage.py", "check", "--fail-level", "WARNING"], env, 60, "manage.py check")
    run([py, "manage.py", "migrate", "--noinput"], env, 120, "manage.py migrate")
    run([py, "manage.py", "ensureadmin"], env, 60, "manage.py ensureadmin")
    out = run([py, "manage.py", "createproject", "Production check"], env, 60, "createproject")
    dsn, token = out.strip().splitlines()[-2:]
    return {"python": py, "env": env, "token": token, "dsn": dsn}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`manage.py serve` in the background; every failure shows what it printed."""

    def __init__(self, python: str, env: dict[str, str], port: int, log: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.log = open(log, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [python, "manage.py", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")[-12000:]

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- manage.py serve printed ---\n{self.output()}", pytrace=False)

    def request(self, path: str, token: str = "", body: bytes | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/x-ndjson"
        req = urllib.request.Request(self.base + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, {"body": exc.read()[:2000].decode(errors="replace")}

    def wait_until(self, what: str, predicate, timeout: float) -> None:
        """Poll until predicate() holds; fail at once if serve exits meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"manage.py serve exited with {self.proc.returncode} while {what}")
            try:
                if predicate():
                    return
            except OSError:  # not listening yet, reset while starting
                pass
            time.sleep(0.3)
        self.fail(f"still {what} after {timeout:.0f} s")

    def stop(self) -> int | None:
        """Ctrl-C, as an operator stops `make run`; None if it did not stop in time."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        finally:
            self.log.close()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_it_serves_and_stores_an_event_from_requirements_txt_alone(broker, deployment, tmp_path):
    require(f"The {broker} broker", BROKERS[broker])
    env = {**deployment["env"], "CELERY_BROKER_URL": BROKERS[broker]}
    token, run_id = deployment["token"], f"production-{broker}-{uuid.uuid4().hex[:8]}"
    served = Served(deployment["python"], env, free_port(), tmp_path / "serve.log")
    try:
        served.wait_until(
            "waiting for the web server", lambda: served.request("/health/live")[0] == 200, 45
        )

        # The web process's own check of the broker: this is where a transport that
        # cannot be imported shows first.
        def healthy() -> bool:
            health = served.request("/health")[1]
            return bool(health.get("db_ok") and health.get("broker_ok"))

        served.wait_until("waiting for /health to say database and broker ok", healthy, 15)
        body = ndjson(
            record("run.begin", slug="prod", data={"command": "run"}),
            record("llm.call", slug="prod", data={"model": "m", "tokens_in": 8}),
            record("run.exit_clean", slug="prod", phase="DONE"),
        )
        status, answer = served.request(f"/api/ingest/events?run_id={run_id}", token, body)
        if (status, answer.get("accepted")) != (202, 3):
            served.fail(f"ingest answered {status} {answer}")

        def stored() -> bool:
            status, run = served.request(f"/api/runs/{run_id}", token)
            return status == 200 and run["counters"]["events"] == 3 and run["status"] == "succeeded"

        served.wait_until("waiting for the worker to store the events", stored, 45)

        # A Sentry SDK's event, by the DSN createproject printed: the fourth protocol
        # through the same spool and worker.
        key, project_id = (
            deployment["dsn"].split("://")[1].split("@")[0],
            deployment["dsn"].rsplit("/", 1)[1],
        )
        req = urllib.request.Request(
            f"{served.base}/api/{project_id}/store/",
            data=json.dumps({"message": f"deploy failed on {broker}", "level": "error"}).encode(),
            headers={"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={key}"},
        )
        with urllib.request.urlopen(req, timeout=10) as response:
            event_id = json.load(response)["id"]

        def grouped() -> bool:
            status, groups = served.request("/api/errors?source=sentry", token)
            return status == 200 and any(g["title"].endswith(broker) for g in groups["items"])

        served.wait_until(f"waiting for the worker to group Sentry event {event_id}", grouped, 45)
    finally:
        code = served.stop()
    if code != 0:
        served.fail(f"manage.py serve did not stop cleanly on Ctrl-C (exit code {code})")
    if "Traceback" in served.output():
        served.fail("manage.py serve printed a traceback")
