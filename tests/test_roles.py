"""The deployed shape (issue 14) and a broker blip (issue 15): web, worker and beat as
separate `serve --role` processes sharing only PostgreSQL and Redis; a dead child of
`serve` started again while the web server keeps answering; a worker that outlives its
broker going away and stores what was spooled meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from portal.management.commands.serve import Command as Serve
from runs.models import Event, Run
from telemetry import tasks
from telemetry.models import IngestBatch, WorkerHeartbeat
from tests.conftest import ndjson, record, redis_url
from tests.processes import ROOT, free_port, wait_for
from tests.test_worker import database_url, use_broker

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# Redis database 11 (another per test process, tests.conftest.redis_url): 12 to 14
# belong to other tests, 15 to the benchmarks.
REDIS_URL = os.environ.get("TEST_ROLES_REDIS_URL") or redis_url(11)


def get(url: str, cookie: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def post_events(port: int, token: str, run_id: str, *records: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/ingest/events?run_id={run_id}",
        data=ndjson(*records),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        return json.load(response)


def role_env(var_dir: Path, broker: str, **extra: str) -> dict:
    var_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": broker,
        "RUNLENS_VAR_DIR": str(var_dir),
        "SECRET_KEY": settings.SECRET_KEY,  # the web role's sessions are this process's
        "INGEST_RATE_PER_MINUTE": "0",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    return env


def serve(*args: str) -> list[str]:
    return [sys.executable, "manage.py", "serve", *args]


@pytest.fixture
def shared_redis():
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; .ci/run starts it")
    yield REDIS_URL
    redis.Redis.from_url(REDIS_URL).flushdb()


def test_web_worker_and_beat_on_their_own_var_dirs_behave_as_one_portal(
    token, project, operator, shared_redis, processes, tmp_path
):
    port = free_port()
    web_var, worker_var, beat_var = (tmp_path / f"var-{n}" for n in ("web", "worker", "beat"))
    processes.start(
        "web", serve("--role", "web", "--bind", f"127.0.0.1:{port}"), role_env(web_var, REDIS_URL)
    )
    processes.start(
        "worker",
        serve("--role", "worker", "--concurrency", "1", "--name", "roles-test@%h"),
        role_env(worker_var, REDIS_URL),
    )
    processes.start("beat", serve("--role", "beat"), role_env(beat_var, REDIS_URL))
    assert wait_for(lambda: get(f"http://127.0.0.1:{port}/health/live")[0] == 200, 40)

    # Events posted to the web role are stored by the worker on another var dir.
    answer = post_events(port, token, "roles-1", record("run.begin"), record("run.exit_clean"))
    assert answer["accepted"] == 2
    assert wait_for(lambda: Event.objects.filter(run__run_id="roles-1").count() == 2, 45)

    # The web role sees the worker, through PostgreSQL: /health and the status page.
    assert wait_for(lambda: WorkerHeartbeat.objects.filter(hostname__startswith="roles-test@"))
    body = json.loads(get(f"http://127.0.0.1:{port}/health")[1])
    assert body["metrics"]["workers_seen"] >= 1 and body["broker_ok"] is True
    client = Client()
    client.force_login(operator)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    status, html = get(f"http://127.0.0.1:{port}/status", cookie)
    assert status == 200 and "<code>roles-test@" in html
    assert "queues housekeeping,ingest,notifications" in html

    # Beat, on a third var dir, drives the housekeeping the worker does: a silent run is
    # marked orphaned within beat's 30 s.
    silent = Run.objects.create(
        project=project,
        run_id="silent",
        status="running",
        watched=True,
        last_heartbeat=timezone.now() - timedelta(minutes=10),
    )
    assert wait_for(lambda: Run.objects.get(pk=silent.pk).status == "orphaned", 75)

    # Nothing was shared through local files.
    for var_dir in (web_var, worker_var, beat_var):
        assert not (var_dir / "status").exists() and not (var_dir / "broker").exists()


def test_a_separate_role_refuses_the_filesystem_broker_with_a_clear_message(tmp_path):
    env = role_env(tmp_path, "")
    env.pop("CELERY_BROKER_URL")
    done = subprocess.run(
        serve("--role", "worker"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "serve --role worker needs CELERY_BROKER_URL" in done.stderr
    assert "--role all" in done.stderr


def test_tasks_go_to_their_queue_by_name():
    from portal.celery import app as celery_app

    def queue(name: str) -> str:
        return celery_app.amqp.router.route({}, name)["queue"].name

    assert queue("telemetry.tasks.process_batch") == "ingest"
    assert queue("telemetry.tasks.prune") == "housekeeping"
    assert queue("runs.tasks.detect_orphans") == "housekeeping"
    assert queue("telemetry.tasks.sweep_pending") == "housekeeping"
    # Alert delivery, however its author names it, and anything new.
    assert queue("telemetry.tasks.deliver_notification") == "notifications"
    assert queue("telemetry.tasks.evaluate_alert_rules") == "notifications"
    assert queue("telemetry.tasks.something_new") == "housekeeping"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bind", "8000"], "--bind must be HOST:PORT"),
        (["--bind", "0.0.0.0:99999"], "--bind must be HOST:PORT"),
        (["--queues", "ingest,celery"], "--queues takes a comma-separated list"),
    ],
)
def test_serve_refuses_bad_options_with_a_clear_message(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("serve", *args)


def test_serve_starts_a_dead_worker_again_and_the_web_server_keeps_answering(
    token, processes, tmp_path
):
    port = free_port()
    env = role_env(tmp_path / "var", "")
    env.pop("CELERY_BROKER_URL")  # role all: the filesystem broker under its var dir
    serve_proc = processes.start("serve", serve("--port", str(port)), env)
    assert wait_for(lambda: get(f"http://127.0.0.1:{port}/health/live")[0] == 200, 40)

    def worker_main() -> psutil.Process | None:
        for child in psutil.Process(serve_proc.pid).children():
            if " worker " in " ".join(child.cmdline()):
                return child
        return None

    first = worker_main()
    assert first is not None
    first.kill()
    first.wait(10)
    # The web server answers all along, events are accepted and spooled...
    assert get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    assert post_events(port, token, "after-kill", record("a.b"))["accepted"] == 1
    # ...and serve starts a new worker, which stores them.
    assert wait_for(lambda: (w := worker_main()) is not None and w.pid != first.pid, 20)
    assert wait_for(lambda: Event.objects.filter(run__run_id="after-kill").count() == 1, 60)
    assert serve_proc.poll() is None
    assert "worker exited with" in processes.log("serve")


def test_a_worker_outlives_its_broker_and_stores_what_was_spooled_meanwhile(
    client, token, own_redis, processes, tmp_path, settings
):
    """Issue 15: Redis stopped under load used to kill the worker on reconnect
    ("Unrecoverable error: AttributeError: 'NoneType' object has no attribute 'hostname'")."""
    from portal.celery import app as celery_app

    url, start_redis, stop_redis = own_redis
    celery_app.conf.task_always_eager = False
    use_broker(url)
    try:
        command = Serve().commands(
            "127.0.0.1", 0, ["ingest"], concurrency=2, name="", web_workers=1
        )
        worker = processes.start("worker", command["worker"], role_env(tmp_path / "var", url))
        body = ndjson(*[record("tool.call", data={"i": i, "pad": "x" * 200}) for i in range(1500)])

        def post(run_id: str) -> None:
            response = client.post(
                f"/api/ingest/events?run_id={run_id}",
                body,
                content_type="application/x-ndjson",
                HTTP_AUTHORIZATION=f"Bearer {token}",
            )
            assert response.status_code == 202, response.content

        # A backlog, so the worker holds messages it has not acknowledged yet...
        for i in range(16):
            post(f"before-{i}")
        assert wait_for(lambda: Event.objects.exists(), 30), processes.log("worker")
        # ...when its broker goes away for a few seconds, while ingest goes on.
        stop_redis()
        for i in range(4):
            post(f"during-{i}")
        time.sleep(5)
        start_redis()  # an empty Redis: what was queued is gone, the spool is not

        settings.SWEEP_PENDING_AFTER_SECONDS = 1

        def all_stored() -> bool:
            if worker.poll() is not None:
                return True  # dead: stop waiting, the assertion below says so
            if IngestBatch.objects.filter(state="pending").exists():
                tasks.sweep_pending()  # beat's sweeper, run here
                time.sleep(1)
                return False
            return True

        assert wait_for(all_stored, 120)
        assert worker.poll() is None, (
            "the worker died with its broker:\n" + processes.log("worker")[-3000:]
        )
        assert "Unrecoverable error" not in processes.log("worker")
        # Every batch stored exactly once.
        assert IngestBatch.objects.filter(state="done").count() == 20
        assert Event.objects.count() == 20 * 1500
    finally:
        celery_app.conf.task_always_eager = True
        use_broker(settings.CELERY_BROKER_URL)
        celery_app.conf.broker_transport_options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
