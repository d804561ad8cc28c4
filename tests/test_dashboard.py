"""`manage.py dashboard`: one frame with --once, and a live loop that Ctrl-C ends cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from runs.models import Run
from tests.conftest import ndjson, record
from tests.test_worker import database_url

BASE = Path(__file__).resolve().parent.parent


def ts(seconds_ago: float) -> str:
    return (timezone.now() - timedelta(seconds=seconds_ago)).isoformat()


def once() -> str:
    out = StringIO()
    call_command("dashboard", "--once", stdout=out)
    return out.getvalue()


def test_it_prints_one_frame_of_an_empty_installation(db):
    text = once()
    assert "Runlens dashboard" in text and "\x1b[2J" not in text
    assert "active 0   orphaned 0" in text
    assert "error rate —" in text
    assert "no failing tools" in text


def test_it_summarises_the_last_hour(post_events, project):
    post_events(
        ndjson(
            record("run.begin", ts(3000)),
            record(
                "llm.call",
                ts(30),
                data={"model": "m", "tokens_in": 1200, "tokens_out": 300, "cost_usd": 0.42},
            ),
            record("tool.result", ts(20), data={"tool": "bash", "success": False}),
            record("tool.result", ts(10), data={"tool": "bash", "success": True}),
            record("tool.error", ts(5), level="error", data={"tool": "bash"}),
            record("old.event", ts(7200)),  # two hours ago: not in the last hour
        ),
        run_id="dash-1",
    )
    Run.objects.create(project=project, run_id="lost", status="orphaned")
    text = once()
    assert "active 1   orphaned 1" in text
    # 5 events in the last hour, 1 error-level; 4 in the last minute.
    assert "5 last hour" in text and "4 last minute" not in text
    assert f"{4 / 60:,.1f}/s last minute" in text
    assert "1 last hour   error rate 20.0 %" in text
    assert "tokens in 1,200 / out 300" in text and "cost $0.4200" in text
    line = next(line for line in text.splitlines() if line.strip().startswith("bash"))
    assert line.split()[1:4] == ["3", "2", "33.3%"]


def test_it_refuses_a_silly_interval(db):
    with pytest.raises(CommandError):
        call_command("dashboard", "--interval", "0")


def test_ctrl_c_ends_the_live_view_cleanly(db):
    # database_url() also covers the embedded server, reached through its socket folder.
    env = {**os.environ, "DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1"}
    env.pop("TEST_DATABASE_NAME", None)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "dashboard", "--interval", "0.2"],
        cwd=BASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A test run started in the background (`cmd &`, nohup) ignores SIGINT, and a
        # child inherits that: Python then installs no KeyboardInterrupt handler and
        # Ctrl-C would never reach the command. Give it the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        seen = b""
        while seen.count(b"\x1b[2J") < 2 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # it exited: say why rather than spin until the deadline
                pytest.fail(proc.stderr.read().decode(errors="replace")[-2000:])
            seen += chunk
        assert seen.count(b"\x1b[2J") >= 2, seen  # redrawn, with the screen cleared
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
