"""`make run` in miniature: `manage.py serve` runs web + worker + beat and Ctrl-C stops them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from runs.models import Event
from tests.conftest import ndjson, record
from tests.processes import ROOT, free_port, wait_for
from tests.test_worker import database_url

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_serve_runs_web_worker_and_beat_and_stops_them_all_on_ctrl_c(token, tmp_path):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "RUNLENS_VAR_DIR": str(tmp_path)}
    env.pop("CELERY_BROKER_URL", None)  # the default: filesystem broker under var/
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/openapi.json", timeout=1)
                return True
            except OSError:
                return False

        assert wait_for(answers, 30), "web server did not come up"
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "gunicorn" in names and " worker " in names and " beat " in names

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/ingest/events?run_id=served",
            data=ndjson(record("run.begin"), record("run.exit_clean")),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            assert json.load(response)["accepted"] == 2
        assert wait_for(lambda: Event.objects.count() == 2, 45), "worker did not store events"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
    finally:
        if proc.poll() is None:
            proc.kill()
