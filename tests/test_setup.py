"""The first minutes of an installation: settings, projects, the admin user."""

from __future__ import annotations

import io
import stat

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from portal import settings as portal_settings
from runs.models import Project, ProjectToken


def test_createproject_prints_a_working_token_alone_on_the_last_line(db):
    out, err = io.StringIO(), io.StringIO()
    call_command("createproject", "Gas Town", stdout=out, stderr=err)
    token = out.getvalue().strip().splitlines()[-1]
    assert token.startswith("rl_") and " " not in token
    project = Project.objects.get(slug="gas-town")
    assert Project.for_token(token) == project
    assert token not in str(list(ProjectToken.objects.values()))  # only the hash is kept
    assert "shown once" in err.getvalue()


def test_createproject_prints_the_sentry_dsn_on_a_line_of_its_own(db, settings):
    settings.RUNLENS_URL = "https://runlens.example.com:8443"
    out = io.StringIO()
    call_command("createproject", "Code Buddy", stdout=out, stderr=io.StringIO())
    dsn, token = out.getvalue().strip().splitlines()[-2:]
    project = Project.objects.get(slug="code-buddy")
    assert dsn == f"https://{project.public_key}@runlens.example.com:8443/{project.pk}"
    assert Project.for_token(token) == project


def test_rotating_tokens_revokes_the_old_ones(project):
    old = project.create_token()
    new = project.rotate_tokens()
    assert Project.for_token(old) is None
    assert Project.for_token(new) == project


def test_ensureadmin_creates_the_admin_once_and_keeps_the_password(db, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    call_command("ensureadmin", stdout=out)
    password = out.getvalue().split("password: ")[1].split()[0]
    user = User.objects.get(username="admin")
    assert user.is_superuser and user.check_password(password)
    saved = tmp_path / "admin-password.txt"
    assert password in saved.read_text()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600

    again = io.StringIO()
    call_command("ensureadmin", stdout=again)
    assert again.getvalue() == ""
    assert User.objects.count() == 1


@pytest.mark.parametrize(
    ("helper", "value"),
    [
        (lambda: portal_settings.env_int("X_INT", 1), "ten"),
        (lambda: portal_settings.env_int("X_INT", 1), "-5"),
        (lambda: portal_settings.env_bool("X_INT", True), "maybe"),
    ],
)
def test_bad_settings_fail_loudly_naming_the_variable(monkeypatch, helper, value):
    monkeypatch.setenv("X_INT", value)
    with pytest.raises(ImproperlyConfigured, match="X_INT"):
        helper()


def test_database_urls_are_parsed_for_tcp_and_sockets():
    tcp = portal_settings.parse_database_url("postgres://u:p%40ss@db.local:6543/runlens")
    assert (tcp["USER"], tcp["PASSWORD"], tcp["HOST"], tcp["PORT"], tcp["NAME"]) == (
        "u",
        "p@ss",
        "db.local",
        "6543",
        "runlens",
    )
    sock = portal_settings.parse_database_url("postgresql://postgres:@/runlens?host=/tmp/pg")
    assert (sock["HOST"], sock["NAME"], sock["OPTIONS"]) == ("/tmp/pg", "runlens", {})
    with pytest.raises(ImproperlyConfigured):
        portal_settings.parse_database_url("mysql://x/y")
    with pytest.raises(ImproperlyConfigured):
        portal_settings.parse_database_url("postgres://host/")


def test_responses_carry_a_request_id(client):
    generated = client.get("/api/openapi.json")["X-Request-ID"]
    assert len(generated) == 36 and generated[14] == "7"  # a UUIDv7
    assert (
        client.get("/api/openapi.json", HTTP_X_REQUEST_ID="req-12345678")["X-Request-ID"]
        == "req-12345678"
    )
    assert client.get("/api/openapi.json", HTTP_X_REQUEST_ID="<script>")["X-Request-ID"] != (
        "<script>"
    )


def test_the_admin_resets_orphaned_runs_to_cancelled(project, client):
    from runs.models import Run

    admin = User.objects.create_superuser("root", "", "pw-123456789")
    client.force_login(admin)
    orphan = Run.objects.create(project=project, run_id="o", status="orphaned")
    live = Run.objects.create(project=project, run_id="l", status="running")
    response = client.post(
        "/admin/runs/run/",
        {"action": "reset_orphaned", "_selected_action": [orphan.pk, live.pk]},
    )
    assert response.status_code == 302
    assert Run.objects.get(pk=orphan.pk).status == "cancelled"
    assert Run.objects.get(pk=live.pk).status == "running"
    assert client.get("/admin/runs/run/?status__exact=orphaned").status_code == 200


def test_pages_carry_a_strict_content_security_policy(client):
    response = client.get("/login/")
    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe" not in policy
    assert "frame-ancestors 'none'" in policy
    assert b'"allowEval": false' in response.content
    assert client.get("/static/vendor/htmx-2.0.11.min.js").status_code == 200


def test_every_page_shares_the_nav_and_marks_its_section(operator_client):
    runs = operator_client.get("/").content.decode()
    errors = operator_client.get("/errors").content.decode()
    assert 'href="/" aria-current="page">Runs</a>' in runs
    assert 'href="/errors">Errors</a>' in runs
    assert 'href="/errors" aria-current="page">Errors</a>' in errors
