from __future__ import annotations

import json

from runs.models import Run


def beat(client, token, run_id: str, body: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body or {})
    return client.post(
        f"/api/runs/{run_id}/heartbeat",
        data,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


def test_it_refreshes_the_heartbeat_phase_pid_and_host(client, token):
    response = beat(client, token, "r1", {"phase": "WORKING", "pid": 1234, "host": "box"})
    assert response.status_code == 200
    run = Run.objects.get(run_id="r1")
    assert run.last_heartbeat is not None
    assert (run.phase, run.pid, run.host) == ("WORKING", 1234, "box")
    assert response.json()["status"] == "running"


def test_it_revives_an_orphaned_run(client, token, project):
    Run.objects.create(project=project, run_id="r1", status=Run.Status.ORPHANED)
    beat(client, token, "r1", {})
    assert Run.objects.get(run_id="r1").status == "running"


def test_it_does_not_reopen_a_finished_run(client, token, project):
    Run.objects.create(project=project, run_id="r1", status=Run.Status.SUCCEEDED)
    beat(client, token, "r1", {})
    assert Run.objects.get(run_id="r1").status == "succeeded"


def test_bad_heartbeats_get_400_and_no_token_401(client, token):
    assert beat(client, token, "r1", {"pid": "many"}).status_code == 400
    assert beat(client, token, "r1", {"pid": -1}).status_code == 400
    assert beat(client, token, "r1", raw=b"{nope").status_code == 400
    assert beat(client, token, "r1", {"phase": "x" * 65}).status_code == 400
    assert beat(client, "rl_nope", "r1", {}).status_code == 401
    assert not Run.objects.exists()


def test_a_heartbeat_with_text_postgresql_refuses_is_a_400_naming_it(client, token):
    for body, named in (
        ('{"phase": "WORK\\u0000ING"}', "NUL"),  # was a 500 from the database driver
        ('{"host": "h\\ud800"}', "host"),
    ):
        response = client.post(
            "/api/runs/r1/heartbeat",
            body,
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
        assert response.status_code == 400
        assert named in str(response.json()["detail"])


def test_a_heartbeat_body_that_is_not_an_object_is_a_400(client, token):
    for raw in (b"[false]", b'"str"', b"123", b"null", b"[]", b"true"):
        response = beat(client, token, "r1", raw=raw)
        assert response.status_code == 400, raw
        assert "JSON object" in str(response.json()["detail"]), raw
    assert not Run.objects.exists()


def test_a_heartbeat_without_a_body_is_still_a_sign_of_life(client, token):
    response = client.post(
        "/api/runs/r1/heartbeat", b"", "application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert response.status_code == 200
    assert Run.objects.get(run_id="r1").last_heartbeat is not None
