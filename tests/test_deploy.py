"""The deployment kit (deploy/, docs/deploy.md): the documented production environment
passes `manage.py check --deploy` with no warning, collectstatic fills STATIC_ROOT, and
every systemd unit starts a role `serve` accepts."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from portal.management.commands.serve import Command as Serve
from tests.test_worker import database_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def documented_environment(tmp_path: Path) -> dict[str, str]:
    """deploy/runlens.env as an operator fills it in: its CHANGE-ME values replaced."""
    env = {}
    for line in (DEPLOY / "runlens.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    env.update(
        SECRET_KEY=secrets.token_urlsafe(50),
        METRICS_TOKEN=secrets.token_urlsafe(24),
        DATABASE_URL=database_url(),
        STATIC_ROOT=str(tmp_path / "static"),
        RUNLENS_VAR_DIR=str(tmp_path / "var"),
    )
    assert not [name for name, value in env.items() if "CHANGE-ME" in value]
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}


def manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db
def test_check_deploy_is_clean_under_the_documented_production_environment(tmp_path):
    done = manage(documented_environment(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


@pytest.mark.django_db
def test_the_development_defaults_are_what_check_deploy_warns_about(tmp_path):
    env = {**documented_environment(tmp_path), "SESSION_COOKIE_SECURE": "false"}
    done = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode != 0 and "security.W012" in done.stdout + done.stderr


@pytest.mark.django_db
def test_collectstatic_fills_static_root(tmp_path):
    env = documented_environment(tmp_path)
    done = manage(env, "collectstatic", "--noinput")
    assert done.returncode == 0, done.stdout + done.stderr
    static = Path(env["STATIC_ROOT"])
    assert (static / "runlens-beacon.js").exists()
    assert (static / "admin").is_dir()  # the admin's own files come along


@pytest.mark.parametrize("unit", sorted(p.name for p in DEPLOY.glob("*.service")))
def test_each_systemd_unit_starts_a_role_serve_accepts(unit):
    text = (DEPLOY / unit).read_text()
    assert "EnvironmentFile=/etc/runlens/runlens.env" in text
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", text, re.MULTILINE)
    argv = shlex.split(exec_start.replace("%i", "ingest").replace("%H", "host"))
    assert argv[1:3] == ["manage.py", "serve"]
    options = Serve().create_parser("manage.py", "serve").parse_args(argv[3:])
    assert options.role in ("web", "worker", "beat")
    assert options.role in unit
