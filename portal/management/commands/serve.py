"""`make run` and the deployed roles: the web server, Celery workers and Celery beat.

`serve` (role `all`) runs all three on this machine, `make run`'s default; `--role web`,
`--role worker`, `--role beat` run one each, on as many hosts as wanted, sharing nothing
but PostgreSQL and the broker (docs/deploy.md).

serve supervises its children: one that dies is started again after a pause that doubles
with each quick death (1 s up to 60 s), while the others keep running. A worker that
died with its broker must not take the web server, which still accepts and spools
events, down with it (issue 15). Ctrl-C (or SIGTERM) stops them all, then the embedded
PostgreSQL if this role started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.celery import QUEUES

ROLES = ("all", "web", "worker", "beat")
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 30.0  # a child that ran this long starts its next backoff from the first step


@dataclass
class Child:
    name: str
    command: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    delay: float = BACKOFF_FIRST_S
    restarts: int = 0


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--bind must be HOST:PORT (e.g. 127.0.0.1:8000), got {value!r}")
    return host, int(port)


def parse_queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise CommandError(
            f"--queues takes a comma-separated list of {', '.join(QUEUES)}; got {value!r}"
        )
    return queues


def refusals(role: str) -> list[str]:
    """Why this role cannot run apart from the others, if it cannot."""
    if role == "all":
        return []
    problems = []
    if settings.CELERY_BROKER_URL.startswith("filesystem:"):
        problems.append(
            f"serve --role {role} needs CELERY_BROKER_URL (redis://… or amqp://…): the "
            "default broker is a folder under this host's RUNLENS_VAR_DIR, which the other "
            "roles cannot reach. Use --role all to run everything on one machine."
        )
    if not os.environ.get("DATABASE_URL"):
        problems.append(
            f"serve --role {role} needs DATABASE_URL: the embedded PostgreSQL under "
            "RUNLENS_VAR_DIR listens on a local socket only."
        )
    if role == "web" and not os.environ.get("SECRET_KEY"):
        problems.append(
            "serve --role web needs SECRET_KEY, the same on every web host: a key "
            "generated under RUNLENS_VAR_DIR differs per host and breaks sessions."
        )
    return problems


def web_command(port: int, workers: int, threads: int = 4, host: str = "127.0.0.1") -> list[str]:
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
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
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
    help = "Run Runlens: web + worker + beat (--role all, the default) or one role of them."

    def add_arguments(self, parser):
        parser.add_argument("--role", choices=ROLES, default="all")
        parser.add_argument(
            "--bind",
            default="",
            help="HOST:PORT of the web server (default 127.0.0.1:$PORT)",
        )
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--web-workers", type=int, default=2)
        parser.add_argument(
            "--queues",
            default=",".join(QUEUES),
            help=f"queues the worker consumes (default: {','.join(QUEUES)})",
        )
        parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
        parser.add_argument(
            "--name",
            default="",
            help="the worker's node name (default celery@HOSTNAME); "
            "give each worker on one host its own",
        )

    def handle(self, role: str, bind: str, port: int, **options):
        problems = refusals(role)
        if problems:
            raise CommandError("\n".join(problems))
        host, port = parse_bind(bind) if bind else ("127.0.0.1", port)
        queues = parse_queues(options["queues"])
        if options["concurrency"] < 1 or options["web_workers"] < 1:
            raise CommandError("--concurrency and --web-workers must be at least 1")
        commands = self.commands(
            host,
            port,
            queues,
            concurrency=options["concurrency"],
            name=options["name"],
            web_workers=options["web_workers"],
        )
        wanted = list(commands) if role == "all" else [role]
        children = [Child(name, commands[name]) for name in wanted]

        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL}
        for child in children:
            self.start(child, env)
        if "web" in wanted:
            self.stdout.write(f"Runlens on http://{host}:{port}/ (Ctrl-C stops everything)")
        self.stdout.flush()
        try:
            while not stopping:
                now = time.monotonic()
                for child in children:
                    self.supervise(child, env, now)
                time.sleep(0.2)
        finally:
            self.stop_all(children)
            if role == "all" and not os.environ.get("DATABASE_URL"):
                from portal.embedded import stop_embedded

                stop_embedded(settings.VAR_DIR / "pgdata")
        sys.exit(0)

    def commands(
        self, host: str, port: int, queues: list[str], concurrency: int, name: str, web_workers: int
    ) -> dict[str, list[str]]:
        py = sys.executable
        worker = [py, "-m", "celery", "-A", "portal", "worker", "--loglevel", "INFO"]
        worker += ["--queues", ",".join(queues), "--concurrency", str(concurrency)]
        worker += ["--without-mingle", "--without-gossip"]
        if name:
            worker += ["--hostname", name]
        return {
            "web": web_command(port, web_workers, host=host),
            "worker": worker,
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

    def start(self, child: Child, env: dict) -> None:
        child.proc = subprocess.Popen(child.command, env=env)
        child.started = time.monotonic()
        child.restart_at = None

    def supervise(self, child: Child, env: dict, now: float) -> None:
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                self.stderr.write(f"{child.name}: starting again (restart {child.restarts})")
                self.start(child, env)
            return
        if child.proc is None or child.proc.poll() is None:
            return
        if now - child.started >= STABLE_AFTER_S:
            child.delay = BACKOFF_FIRST_S
        self.stderr.write(
            f"{child.name} exited with {child.proc.returncode}; "
            f"starting it again in {child.delay:g} s, the others keep running"
        )
        child.restart_at = now + child.delay
        child.delay = min(BACKOFF_MAX_S, child.delay * 2)

    def stop_all(self, children: list[Child]) -> None:
        running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
