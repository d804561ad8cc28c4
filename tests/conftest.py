"""The small named world every test starts from.

Two projects (ours and a stranger's), each with an ingest token, and an operator
who can log in. Celery tasks run eagerly inside the test process unless a test
asks for the real worker (tests/test_worker.py), so the code under test is the
real ingest path on the real database, only without a broker hop.
"""

from __future__ import annotations

import gzip
import json
import os
import sys

import orjson
import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client

from portal.celery import app as celery_app
from runs.models import Project
from tests.fixtures.otlp.payloads import to_json
from tests.processes import own_redis, processes  # noqa: F401 (fixtures for every module)


@pytest.fixture(autouse=True, scope="session")
def eager_celery():
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield


CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it (no browser download)


def redis_url(db: int) -> str:
    """A Redis database of the tests' own: under pytest-xdist each test process gets
    its own numbers (db, db - 5, …), so two real workers never share a queue."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return f"redis://127.0.0.1:6379/{db - 5 * index}"


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium, driven by Playwright, for the browser tests of a module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    # Playwright's sync API runs an event loop in this thread; the ORM calls made
    # between browser steps are still plain synchronous ones.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                # ORM calls made while Playwright's loop was active got their own
                # connection; close it, or the test database cannot be dropped.
                connections.close_all()
                browser.close()


@pytest.fixture(autouse=True)
def fresh_sentry_scopes():
    """Tests that use the real sentry-sdk start from empty scopes: a transaction name,
    tags or a user set by an earlier test must not reach their events."""
    sdk = sys.modules.get("sentry_sdk")
    if sdk is not None:
        for scope in (sdk.get_global_scope(), sdk.get_isolation_scope(), sdk.get_current_scope()):
            scope.clear()
    yield


@pytest.fixture(autouse=True)
def private_status_dir(settings, tmp_path_factory):
    """Local state (the generated secret key, the filesystem broker) goes to a test
    folder, never into the var/ of the installation the tests run from."""
    settings.VAR_DIR = tmp_path_factory.mktemp("var")


@pytest.fixture
def project(db) -> Project:
    return Project.objects.create(name="Acme agents", slug="acme")


@pytest.fixture
def token(project) -> str:
    return project.create_token()


@pytest.fixture
def stranger(db) -> tuple[Project, str]:
    other = Project.objects.create(name="Stranger", slug="stranger")
    return other, other.create_token()


@pytest.fixture
def operator(db) -> User:
    return User.objects.create_user("alice", password="correct horse battery")


@pytest.fixture
def operator_client(operator) -> Client:
    client = Client()
    client.force_login(operator)
    return client


def record(event: str, ts: str = "2026-04-21T05:12:34.123+00:00", **fields) -> dict:
    """A Gitoma trace record with sensible defaults."""
    return {
        "ts": ts,
        "slug": fields.pop("slug", "octocat__hello-world"),
        "phase": fields.pop("phase", ""),
        "level": fields.pop("level", "info"),
        "event": event,
        "data": fields.pop("data", {}),
        **fields,
    }


def ndjson(*records: dict | str) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


@pytest.fixture
def post_events(client, token, django_capture_on_commit_callbacks):
    """POST a body to the ingest endpoint and let the (eager) worker process it."""

    def post(
        body: bytes,
        *,
        run_id: str = "",
        gzip_it: bool = False,
        auth: str | None = None,
        content_type: str = "application/x-ndjson",
        **headers,
    ):
        extra = {"HTTP_AUTHORIZATION": f"Bearer {token if auth is None else auth}"}
        if gzip_it:
            body = gzip.compress(body)
            extra["HTTP_CONTENT_ENCODING"] = "gzip"
        for name, value in headers.items():
            extra["HTTP_" + name.upper().replace("-", "_")] = value
        url = "/api/ingest/events" + (f"?run_id={run_id}" if run_id else "")
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(url, body, content_type=content_type, **extra)

    return post


@pytest.fixture
def post_otlp(client, token, django_capture_on_commit_callbacks):
    """POST an OTLP request (protobuf, or its OTLP-JSON twin); the worker stores it."""

    def post(signal: str, message, *, json: bool = False, auth: str | None = None, gz=False):
        """`message`: a protobuf request, or (with json=True) an OTLP-JSON dict as is."""
        if json:
            payload = message if isinstance(message, dict) else to_json(message)
            body, content_type = orjson.dumps(payload), "application/json"
        else:
            body, content_type = message.SerializeToString(), "application/x-protobuf"
        extra = {"HTTP_AUTHORIZATION": f"Bearer {token if auth is None else auth}"}
        if gz:
            body = gzip.compress(body)
            extra["HTTP_CONTENT_ENCODING"] = "gzip"
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(f"/v1/{signal}", body, content_type=content_type, **extra)
        assert response.status_code == 200, response.content
        return response

    return post
