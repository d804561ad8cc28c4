"""Request framing as the production server sees it: gunicorn, as `serve` runs it,
spoken to over raw sockets.

Django's test client hands a view its body as bytes, so it cannot show what a server
does with `Transfer-Encoding: chunked` or with a body left unread on a kept-alive
connection. These tests write the HTTP/1.1 bytes themselves.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from portal.management.commands.serve import web_command
from runs.models import Artifact, Project, Run
from telemetry.models import ErrorReport, IngestBatch
from tests.conftest import ndjson, record
from tests.test_sentry_receiver import envelope
from tests.test_worker import ROOT, database_url, wait_for

pytestmark = [pytest.mark.django_db(transaction=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[str]:
    """gunicorn with serve's worker class (threads) on the test database: host:port."""
    with django_db_blocker.unblock():
        url = database_url()
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "RUNLENS_VAR_DIR": str(tmp_path_factory.mktemp("var")),
        "FRONTEND_LOG_RATE": "0",
    }
    env.pop("CELERY_BROKER_URL", None)  # the filesystem broker under var/: no worker needed
    proc = subprocess.Popen(
        web_command(port, workers=1),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        assert wait_for(answers, 30), "gunicorn did not come up"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Conn:
    """One kept-alive HTTP/1.1 connection, written and read byte by byte."""

    address: str
    sock: socket.socket = field(init=False)
    buffer: bytes = b""

    def __post_init__(self):
        host, port = self.address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | list[bytes] = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """A list body is sent chunked, one chunk per item; bytes with Content-Length."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.address}"]
        if isinstance(body, list):
            head.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in body if c) + b"0\r\n\r\n"
        else:
            if body or method in ("POST", "PUT"):
                head.append(f"Content-Length: {len(body)}")
            payload = body
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        return self.read_answer()

    def read_answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buffer) < size + 2:
                    self._fill()
                body, self.buffer = body + self.buffer[:size], self.buffer[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                self._fill()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status, headers, body)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(server) -> Iterator[Conn]:
    c = Conn(server)
    yield c
    c.close()


@pytest.fixture
def auth(token) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pieces(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- Chunked request bodies ---------------------------------------------------------


def test_a_chunked_artifact_is_stored_whole(conn, auth, project):
    content = os.urandom(300_000)
    answer = conn.send("PUT", "/api/runs/r1/artifacts/out.bin", pieces(content, 7000), auth)
    assert answer.status == 201, answer.body
    assert answer.json()["size"] == len(content)
    stored = Artifact.objects.get(run__run_id="r1", name="out.bin")
    assert bytes(stored.content) == content


def test_a_chunked_put_does_not_replace_an_artifact_with_nothing(conn, auth, project):
    assert conn.send("PUT", "/api/runs/r1/artifacts/a.txt", b"kept", auth).status == 201
    answer = conn.send("PUT", "/api/runs/r1/artifacts/a.txt", [b"new ", b"text"], auth)
    assert answer.status == 201
    assert bytes(Artifact.objects.get(name="a.txt").content) == b"new text"


def test_a_chunked_gzip_artifact_is_decompressed(conn, auth, project):
    body = gzip.compress(b"line\n" * 10_000)
    headers = {**auth, "Content-Encoding": "gzip"}
    answer = conn.send("PUT", "/api/runs/r1/artifacts/log.txt", pieces(body, 500), headers)
    assert answer.status == 201
    assert answer.json()["size"] == 50_000


def test_chunked_events_are_spooled(conn, auth, project):
    body = ndjson(*[record("tool.call", data={"i": i}) for i in range(200)])
    headers = {**auth, "Content-Type": "application/x-ndjson"}
    answer = conn.send("POST", "/api/ingest/events?run_id=r1", pieces(body, 333), headers)
    assert answer.status == 202, answer.body
    assert answer.json()["accepted"] == 200
    assert IngestBatch.objects.get().read_body() == body


def test_chunked_metrics_are_spooled(conn, auth, project):
    body = json.dumps({"metric_name": "tokens", "metric_value": 3}).encode()
    headers = {**auth, "Content-Type": "application/json"}
    answer = conn.send("POST", "/api/metrics/record", pieces(body, 10), headers)
    assert answer.status in (200, 202), answer.body
    assert IngestBatch.objects.get().read_body() == body


def test_chunked_otlp_logs_are_spooled(conn, auth, project):
    body = json.dumps(
        {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"stringValue": "hello"}}]}]}]}
    ).encode()
    headers = {**auth, "Content-Type": "application/json"}
    answer = conn.send("POST", "/v1/logs", pieces(body, 16), headers)
    assert answer.status == 200, answer.body
    assert IngestBatch.objects.get().read_body() == body


def test_a_chunked_heartbeat_body_is_read(conn, auth, project):
    body = json.dumps({"phase": "WORKING", "pid": 42, "host": "box"}).encode()
    answer = conn.send("POST", "/api/runs/r1/heartbeat", pieces(body, 8), auth)
    assert answer.status == 200, answer.body
    assert Run.objects.values_list("phase", "pid").get() == ("WORKING", 42)


def test_a_chunked_sentry_envelope_is_spooled(conn, project):
    sent = {"event_id": "a" * 32, "message": "boom", "level": "error"}
    body = envelope(({"type": "event"}, sent), header={"event_id": sent["event_id"]})
    headers = {
        "Content-Type": "application/x-sentry-envelope",
        "X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={project.public_key}",
    }
    answer = conn.send("POST", f"/api/{project.pk}/envelope/", pieces(body, 20), headers)
    assert answer.status == 200, answer.body
    assert answer.json() == {"id": sent["event_id"]}
    assert IngestBatch.objects.get().read_body() == body


def test_a_chunked_beacon_is_stored(conn, project):
    body = json.dumps({"message": "boom", "context": {"url": "https://a.example/"}}).encode()
    path = f"/api/frontend-log?key={project.public_key}"
    answer = conn.send("POST", path, pieces(body, 9), {"Content-Type": "text/plain"})
    assert answer.status == 202, answer.body
    assert ErrorReport.objects.get().message == "boom"


def test_a_chunked_body_past_the_limit_is_a_413(conn, auth, project, settings):
    # 20 MB of artifact is the default limit; a chunked body is held to it as well.
    chunk = b"x" * 1024 * 1024
    answer = conn.send("PUT", "/api/runs/r1/artifacts/big.bin", [chunk] * 21, auth)
    assert answer.status == 413
    assert not Artifact.objects.exists()


def test_a_chunked_heartbeat_past_djangos_memory_limit_is_a_413(conn, auth, project):
    body = b'{"phase": "' + b"x" * 3 * 1024 * 1024 + b'"}'
    answer = conn.send("POST", "/api/runs/r1/heartbeat", pieces(body, 65536), auth)
    assert answer.status == 413
    assert "body larger than" in answer.json()["detail"]


# --- Truncated compressed bodies ----------------------------------------------------

GZIP_HEADER = bytes.fromhex("1f8b0800000000000003")
ZLIB_HEADER = bytes.fromhex("789c")


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    "encoding, body", [("gzip", GZIP_HEADER), ("deflate", ZLIB_HEADER)], ids=["gzip", "zlib"]
)
def test_a_truncated_artifact_is_a_400_and_keeps_the_stored_one(
    conn, auth, project, encoding, body, chunked
):
    assert conn.send("PUT", "/api/runs/r1/artifacts/a.txt", b"kept", auth).status == 201
    headers = {**auth, "Content-Encoding": encoding}
    answer = conn.send("PUT", "/api/runs/r1/artifacts/a.txt", [body] if chunked else body, headers)
    assert answer.status == 400, answer.body
    assert "truncated" in answer.json()["detail"]
    assert bytes(Artifact.objects.get(name="a.txt").content) == b"kept"


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    "encoding, body",
    [
        ("gzip", GZIP_HEADER),
        ("deflate", ZLIB_HEADER),
        ("gzip", gzip.compress(b'{"resourceLogs": []}')[:-6]),
        ("deflate", zlib.compress(b'{"resourceLogs": []}')[:-2]),
    ],
    ids=["gzip-header", "zlib-header", "gzip-cut", "zlib-cut"],
)
def test_a_truncated_otlp_body_is_a_400(conn, auth, project, encoding, body, chunked):
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": encoding}
    answer = conn.send("POST", "/v1/logs", [body] if chunked else body, headers)
    assert answer.status == 400, answer.body
    assert not IngestBatch.objects.exists()


# --- Early answers on a kept-alive connection ---------------------------------------


def batch(size: int) -> bytes:
    return ndjson(*[record("tool.call", data={"pad": "x" * 500}) for i in range(size // 560)])


def test_a_401_before_a_body_leaves_the_connection_usable(conn, project):
    # Larger than the 64 KB gunicorn drains by itself, smaller than what we drain.
    headers = {"Authorization": "Bearer rl_wrong", "Content-Type": "application/x-ndjson"}
    refused = conn.send("POST", "/api/ingest/events?run_id=r1", batch(900_000), headers)
    assert refused.status == 401
    assert refused.headers["connection"] == "keep-alive"
    after = conn.send("GET", "/health/live")
    assert after.status == 200


def test_a_401_before_a_body_too_large_to_drain_says_connection_close(conn, project):
    headers = {"Authorization": "Bearer rl_wrong", "Content-Type": "application/x-ndjson"}
    refused = conn.send("POST", "/api/ingest/events?run_id=r1", batch(3_000_000), headers)
    assert refused.status == 401
    assert refused.headers["connection"] == "close"
    with pytest.raises(OSError):
        conn.send("GET", "/health/live")  # closed, as announced


def test_a_413_before_reading_a_huge_body_says_connection_close(server, auth, project):
    # More than is worth draining: the answer says the connection ends, and it does.
    conn = Conn(server)
    try:
        size = 200 * 1024 * 1024
        head = (
            f"PUT /api/runs/r1/artifacts/huge.bin HTTP/1.1\r\nHost: {server}\r\n"
            f"Authorization: {auth['Authorization']}\r\nContent-Length: {size}\r\n\r\n"
        )
        conn.sock.sendall(head.encode() + b"x" * 65536)
        answer = conn.read_answer()
        assert answer.status == 413
        assert answer.headers["connection"] == "close"
    finally:
        conn.close()


def test_a_429_before_the_body_leaves_the_connection_usable(conn, auth, project):
    from telemetry.models import ProjectLimits

    ProjectLimits.objects.create(project=project, ingest_per_minute=1)
    body = batch(600_000)
    headers = {**auth, "Content-Type": "application/x-ndjson"}
    assert conn.send("POST", "/api/ingest/events?run_id=r1", body, headers).status == 202
    for _ in range(5):
        refused = conn.send("POST", "/api/ingest/events?run_id=r1", body, headers)
        assert refused.status == 429
    assert conn.send("GET", "/health/live").status == 200


def test_a_415_before_the_body_leaves_the_connection_usable(conn, auth, project):
    body = b"x" * 800_000
    headers = {**auth, "Content-Encoding": "lzma"}
    refused = conn.send("PUT", "/api/runs/r1/artifacts/a.bin", body, headers)
    assert refused.status == 415
    assert conn.send("GET", "/health/live").status == 200


def test_many_refusals_on_one_connection_never_lose_an_answer(conn, project):
    body = b"x" * 300_000
    for _ in range(20):
        answer = conn.send("PUT", "/api/runs/r1/artifacts/a.bin", body, {"Authorization": "x"})
        assert answer.status == 401
    assert not Project.objects.filter(slug="nobody").exists()
