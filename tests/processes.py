"""Real processes for the tests that need them (test_worker, test_serve, test_roles,
test_faults…): child processes logging to files, a Redis of a test's own that it may stop,
a free port, and waiting for something to become true."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 45.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


class Processes:
    """Child processes of a test, each logging to a file, all stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.procs = folder, {}

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, (proc, log) in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            print(f"--- {name}\n{self.log(name)[-3000:]}")


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, which it may stop and start again (never the shared one)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; .ci/run installs it")
    port = free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(tmp_path)]
    state: dict = {}

    def start() -> None:
        state["proc"] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        assert wait_for(lambda: _pings(client), 10), "redis-server did not start"

    def stop() -> None:
        state["proc"].terminate()
        state["proc"].wait(10)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    if state["proc"].poll() is None:
        stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
