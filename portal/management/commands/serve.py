"""`make run`: the web server, a Celery worker and Celery beat, in the foreground.

Ctrl-C (or SIGTERM) stops all three, then the embedded PostgreSQL if we use it.
If any of them dies, the others are stopped too: a half-running portal that
accepts events nobody processes is worse than a stopped one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand


def web_command(port: int, workers: int, threads: int = 4) -> list[str]:
    """gunicorn as `serve` runs it (tests/test_http_framing.py runs the same). Its
    config module's hook lets an early answer close the connection (docs/http.md)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "portal.wsgi",
        "--config",
        "python:portal.gunicorn_conf",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--graceful-timeout",
        "10",
        # gunicorn 27's control socket sits at one path per user: a second portal
        # (or a test run) on the same machine would take it over.
        "--no-control-socket",
    ]


class Command(BaseCommand):
    help = "Run web + worker + beat until Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--web-workers", type=int, default=2)

    def handle(self, port: int, web_workers: int, **options):
        env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL}
        py = sys.executable
        commands = {
            "web": web_command(port, web_workers),
            "worker": [
                py,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "2",
                "--without-mingle",
                "--without-gossip",
            ],
            "beat": [
                py,
                "-m",
                "celery",
                "-A",
                "portal",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                settings.CELERY_BEAT_SCHEDULE_FILENAME,
            ],
        }
        procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
        self.stdout.write(f"Runlens on http://127.0.0.1:{port}/ (Ctrl-C stops everything)")

        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        code = 0
        try:
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with {proc.returncode}; stopping")
                        code, stopping = proc.returncode or 1, True
                time.sleep(0.5)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for proc in procs.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
            if not os.environ.get("DATABASE_URL"):
                from portal.embedded import stop_embedded

                stop_embedded(settings.VAR_DIR / "pgdata")
        sys.exit(code)
