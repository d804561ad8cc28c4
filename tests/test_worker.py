"""The real thing: a Celery worker process, a Redis broker, committed data.

These tests leave eager mode: the request's on-commit hook sends the batch id
through Redis to a worker started as a separate process against the test
database, and we wait for the rows to become queryable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.db import connection

from portal.celery import app as celery_app
from runs.models import Event, Run
from telemetry.models import IngestBatch
from tests.conftest import ndjson, record, redis_url
from tests.processes import ROOT, wait_for

REDIS_URL = os.environ.get("TEST_REDIS_URL") or redis_url(14)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def database_url() -> str:
    db = connection.settings_dict
    host = db["HOST"] or ""
    if host.startswith("/"):
        return f"postgresql://{db['USER']}:{db['PASSWORD']}@/{db['NAME']}?host={host}"
    return f"postgresql://{db['USER']}:{db['PASSWORD']}@{host}:{db['PORT'] or 5432}/{db['NAME']}"


def use_broker(url: str) -> None:
    """Point the app at another broker and drop connections made to the old one."""
    celery_app.conf.broker_url = url
    celery_app.conf.broker_transport_options = {}
    celery_app.conf.broker_connection_retry = False
    celery_app.conf.task_publish_retry = False
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.fixture
def real_broker():
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; .ci/run starts it")
    celery_app.conf.task_always_eager = False
    use_broker(REDIS_URL)
    yield
    celery_app.conf.task_always_eager = True
    use_broker(settings.CELERY_BROKER_URL)
    celery_app.conf.broker_transport_options = settings.CELERY_BROKER_TRANSPORT_OPTIONS


@contextmanager
def celery_worker(tmp_path, *args: str, **env: str) -> Iterator[subprocess.Popen]:
    """A real Celery worker process on Redis against the test database, logging to
    tmp_path/worker.log; stopped, and its log's tail printed, on the way out."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": REDIS_URL,
        "RUNLENS_VAR_DIR": str(tmp_path),  # its files, not the installation's
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    command = [sys.executable, "-m", "celery", "-A", "portal", "worker"]
    command += ["--without-mingle", "--without-gossip", "--loglevel", "INFO", *args]
    with open(tmp_path / "worker.log", "w+") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.seek(0)
            print(log.read()[-4000:])


@pytest.fixture
def worker(real_broker, tmp_path):
    with celery_worker(tmp_path, "--pool", "solo") as proc:
        yield proc


def test_a_real_worker_processes_ingested_events(worker, client, token):
    body = ndjson(
        record("run.begin"),
        *[record("tool.call", data={"i": i}) for i in range(50)],
        record("run.exit_clean"),
    )
    response = client.post(
        "/api/ingest/events?run_id=live-1",
        body,
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 202
    assert wait_for(lambda: Event.objects.count() == 52), "worker did not store the events"
    run = Run.objects.get(run_id="live-1")
    assert (run.status, run.events_count) == ("succeeded", 52)
    assert IngestBatch.objects.get().state == "done"


def test_with_the_broker_down_the_request_still_succeeds_and_the_sweeper_catches_up(
    real_broker, client, token
):
    use_broker("redis://127.0.0.1:1/0")  # nothing listens on port 1
    response = client.post(
        "/api/ingest/events?run_id=r",
        ndjson(record("a.b")),
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 202
    assert IngestBatch.objects.get().state == "pending"
    call_command("process_batches")
    assert IngestBatch.objects.get().state == "done"
    assert Event.objects.count() == 1
