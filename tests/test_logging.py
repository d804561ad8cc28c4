"""What the portal logs at LOG_LEVEL=INFO: what an operator acts on, not every tick of beat.

Celery's own per-task lines ("Task … received", "… succeeded") are WARNING-only unless
LOG_LEVEL=DEBUG; housekeeping tasks log at INFO only when they changed something.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from portal.celery import app as celery_app
from runs import tasks
from runs.models import Run
from telemetry import tasks as telemetry_tasks
from tests.test_worker import REDIS_URL, ROOT, database_url, real_broker, wait_for  # noqa: F401

CELERY_CHATTER = ("celery.app.trace", "celery.worker.strategy", "celery.beat")


def silent_run(project, run_id: str) -> Run:
    long_ago = timezone.now() - timedelta(hours=1)
    return Run.objects.create(
        project=project, run_id=run_id, last_heartbeat=long_ago, created=long_ago
    )


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_at_info_logs_what_changed_and_nothing_per_task(
    real_broker,  # noqa: F811
    project,
    tmp_path,
):
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": REDIS_URL,
        "RUNLENS_VAR_DIR": str(tmp_path),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    silent_run(project, "gone-quiet")
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool", "solo"]
            + ["--without-mingle", "--without-gossip", "--loglevel", "INFO"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for name in (
            "runs.tasks.detect_orphans",  # marks the silent run: one line
            "runs.tasks.detect_orphans",  # nothing left to mark: no line
            "telemetry.tasks.sweep_pending",
        ):
            celery_app.send_task(name)
        # The solo pool runs messages in order: once the worker has complained about
        # this unknown one, every task above has finished.
        celery_app.send_task("tests.end_of_queue")
        assert wait_for(lambda: "tests.end_of_queue" in log_path.read_text(), timeout=30)
    finally:
        proc.terminate()
        proc.wait(15)
    found = lines(log_path.read_text())
    assert not [line for line in found if line["logger"] in CELERY_CHATTER], found
    ours = [line for line in found if line["logger"] == "runs.tasks"]
    assert [(line["level"], line["msg"]) for line in ours] == [
        ("info", "orphans: 1 run(s) marked orphaned")
    ]
    assert Run.objects.get(run_id="gone-quiet").status == "orphaned"


def ours(caplog, logger: str = "runs.tasks") -> list[logging.LogRecord]:
    # telemetry.retention logs a line of its own (error reports) not under test here.
    return [r for r in caplog.records if r.name == logger]


def test_housekeeping_says_nothing_at_info_when_idle_and_one_line_when_it_acted(project, caplog):
    caplog.set_level(logging.DEBUG, logger="runs.tasks")
    tasks.detect_orphans()
    assert [(r.levelno, r.getMessage()) for r in ours(caplog)] == [
        (logging.DEBUG, "orphans: 0 run(s) marked orphaned")
    ]
    caplog.clear()
    silent_run(project, "quiet")
    tasks.detect_orphans()
    assert [(r.levelno, r.orphaned) for r in ours(caplog)] == [(logging.INFO, 1)]


def test_retention_logs_at_info_only_when_it_deleted_runs(project, caplog):
    caplog.set_level(logging.DEBUG, logger="telemetry.tasks")
    telemetry_tasks.prune()
    assert [r.levelno for r in ours(caplog, "telemetry.tasks")] == [logging.DEBUG]
    caplog.clear()
    project.retention_runs_per_slug = 1
    project.save()
    for i in range(3):
        Run.objects.create(project=project, run_id=f"r{i}", slug="s", status="succeeded")
    telemetry_tasks.prune()
    (line,) = ours(caplog, "telemetry.tasks")
    assert (line.levelno, line.getMessage()) == (logging.INFO, "retention: 2 run(s) deleted")
    assert line.runs_deleted == {"acme": 2}


def celery_levels(log_level: str) -> dict[str, str]:
    code = (
        "import json, portal.settings as s; "
        f"print(json.dumps({{n: s.LOGGING['loggers'][n]['level'] for n in {CELERY_CHATTER!r}}}))"
    )
    # Settings only parse DATABASE_URL; nothing connects.
    env = {**os.environ, "LOG_LEVEL": log_level, "DATABASE_URL": "postgresql://u@127.0.0.1/none"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "log_level, expected", [("DEBUG", "DEBUG"), ("INFO", "WARNING"), ("ERROR", "ERROR")]
)
def test_celery_per_task_lines_follow_log_level_above_info(log_level, expected):
    assert set(celery_levels(log_level).values()) == {expected}
