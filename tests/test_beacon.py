"""POST /api/frontend-log: the public beacon of web apps."""

from __future__ import annotations

import gzip
import json
import time

import pytest
from django.test import override_settings

from runs.models import Project, Run
from telemetry.models import ErrorGroup, ErrorReport

URL = "/api/frontend-log"


def beacon(message: str = "Uncaught TypeError: x is undefined", **fields) -> dict:
    return {
        "level": "error",
        "message": message,
        "error": fields.pop("error", "TypeError: x is undefined"),
        "stack": fields.pop(
            "stack", "TypeError: x is undefined\n    at render (https://app.example.com/app.js:3:9)"
        ),
        "context": fields.pop(
            "context", {"url": "https://app.example.com/p?x=1", "ua": "Chrome", "build": "1.4.2"}
        ),
        **fields,
    }


@pytest.fixture
def send(client, project):
    def send(body, *, key: str | None = None, content_type: str = "text/plain", **headers):
        url = URL + (f"?key={project.public_key if key is None else key}" if key != "" else "")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        extra = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
        return client.generic("POST", url, raw, content_type=content_type, **extra)

    return send


def test_a_text_plain_beacon_is_stored_grouped_and_answered_202(send, project):
    response = send(beacon(user_session="s-1"), **{"X-Request-ID": "req-beacon-0001"})
    assert response.status_code == 202
    assert response["X-Request-ID"] == "req-beacon-0001"
    assert response.json() == {"accepted": True, "request_id": "req-beacon-0001"}
    report = ErrorReport.objects.select_related("group").get()
    assert report.project == project and report.source == "frontend"
    assert report.request_id == "req-beacon-0001"
    assert report.context == {
        "url": "https://app.example.com/p?x=1",
        "ua": "Chrome",
        "build": "1.4.2",
        "user_session": "s-1",  # unknown fields are kept in the context
    }
    assert report.url == "https://app.example.com/p"
    assert len(report.visitor) == 16
    assert (report.group.title, report.group.culprit, report.group.count) == (
        "TypeError: x is undefined",
        "render (/app.js)",
        1,
    )


def test_json_and_missing_content_types_are_accepted_too(send):
    assert send(beacon(), content_type="application/json").status_code == 202
    assert send(beacon(), content_type="").status_code == 202
    assert ErrorGroup.objects.get().count == 2


def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused(send):
    def body_of(size: int) -> bytes:
        empty = json.dumps({"message": "big", "stack": ""}).encode()
        return json.dumps({"message": "big", "stack": "x" * (size - len(empty))}).encode()

    assert len(body_of(65_536)) == 65_536
    assert send(body_of(65_536)).status_code == 202
    response = send(body_of(65_537))
    assert response.status_code == 413
    assert "65536" in response.json()["detail"]
    assert ErrorReport.objects.count() == 1


def test_the_limit_applies_after_decompression(send):
    bomb = gzip.compress(json.dumps({"message": "m", "stack": " " * 1_000_000}).encode())
    assert len(bomb) < 10_000
    assert send(bomb, **{"Content-Encoding": "gzip"}).status_code == 413
    small = gzip.compress(json.dumps(beacon()).encode())
    assert send(small, **{"Content-Encoding": "gzip"}).status_code == 202


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        (b"", "text/plain", 400),
        (b"not json", "text/plain", 400),
        (b"[1, 2]", "text/plain", 400),
        (b'{"level": "error", "context": {}}', "text/plain", 400),
        (b'{"message": "x"}', "application/x-www-form-urlencoded", 415),
        (b"[" * 30_000 + b"]" * 30_000, "text/plain", 400),
    ],
)
def test_bad_bodies_get_a_clear_4xx(send, body, content_type, status):
    response = send(body, content_type=content_type)
    assert response.status_code == status
    assert response.json()["detail"]
    assert ErrorReport.objects.count() == 0


def test_unknown_keys_are_refused(send):
    response = send(beacon(), key="nope")
    assert (response.status_code, response.json()) == (403, {"detail": "unknown key"})


def test_without_a_key_reports_go_to_the_default_project(send):
    assert send(beacon(), key="").status_code == 202
    assert ErrorReport.objects.get().project.slug == "portal"
    assert send(beacon(), key="").status_code == 202
    assert Project.objects.filter(slug="portal").count() == 1


@override_settings(FRONTEND_LOG_DEFAULT_PROJECT="")
def test_keyless_beacons_can_be_turned_off(send):
    response = send(beacon(), key="")
    assert response.status_code == 403
    assert "key" in response.json()["detail"]


def test_secrets_nuls_and_surrogates_are_cleaned_before_storage(send):
    body = (
        b'{"message": "boom\\u0000 \\ud800 Bearer abc.def", "context": '
        b'{"url": "https://u:pw@app.example.com/", "api_key": "sk-123", "n": NaN, '
        b'"nested": {"password": "hunter2"}}}'
    )
    assert send(body).status_code == 202
    report = ErrorReport.objects.get()
    assert "\x00" not in report.message and "abc.def" not in report.message
    assert report.context["api_key"] == "[redacted]"
    assert report.context["nested"] == {"password": "[redacted]"}
    assert report.context["n"] is None
    assert "pw" not in report.context["url"]


def test_deep_stacks_keep_fifty_frames_at_each_end_and_say_so(send):
    frames = "\n".join(f"    at f{i} (https://a.example/app.js:{i}:1)" for i in range(400))
    assert send(beacon(stack="RangeError: too much recursion\n" + frames)).status_code == 202
    report = ErrorReport.objects.get()
    lines = report.stack.splitlines()
    assert len(lines) == 101 and "frames cut" in lines[50]
    assert report.context["_truncated"] is True


def test_a_report_naming_a_run_of_the_project_links_to_it(send, project, stranger):
    run = Run.objects.create(project=project, run_id="agent-run-1")
    Run.objects.create(project=stranger[0], run_id="theirs")
    send(beacon(context={"url": "https://a.example/", "run_id": "agent-run-1"}))
    send(beacon(context={"url": "https://a.example/", "run_id": "theirs"}))
    assert [r.run_id for r in ErrorReport.objects.order_by("id")] == [run.pk, None]


# --- CORS -----------------------------------------------------------------------


@pytest.fixture
def cors_project(project) -> Project:
    project.allowed_origins = "https://app.example.com\nhttps://admin.example.com/"
    project.save()
    return project


def test_a_preflight_from_an_allowed_origin_is_answered(client, cors_project):
    response = client.options(
        f"{URL}?key={cors_project.public_key}",
        HTTP_ORIGIN="https://app.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="content-type",
    )
    assert response.status_code == 204
    assert response["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in response["Access-Control-Allow-Methods"]
    assert "Content-Type" in response["Access-Control-Allow-Headers"]
    assert response["X-Request-ID"]


def test_a_preflight_from_another_origin_gets_no_cors_headers(client, cors_project):
    response = client.options(
        f"{URL}?key={cors_project.public_key}",
        HTTP_ORIGIN="https://evil.example",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
    )
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response


def test_beacons_from_allowed_origins_get_cors_headers_and_others_are_refused(send, cors_project):
    response = send(beacon(), Origin="https://admin.example.com")
    assert response.status_code == 202
    assert response["Access-Control-Allow-Origin"] == "https://admin.example.com"
    assert "X-Request-ID" in response["Access-Control-Expose-Headers"]
    refused = send(beacon(), Origin="https://evil.example")
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in refused
    assert send(beacon(), Origin="null").status_code == 403
    # The portal's own pages may always report; so may clients that send no Origin.
    assert send(beacon(), Origin="http://testserver").status_code == 202
    assert send(beacon()).status_code == 202
    assert ErrorReport.objects.count() == 3


def test_a_wildcard_allows_every_origin(send, project):
    project.allowed_origins = "*"
    project.save()
    assert send(beacon(), Origin="https://anywhere.example").status_code == 202


@pytest.mark.parametrize("filler", ["x", "a.", "at f (", "1:", "sk-"])
def test_a_body_made_to_backtrack_is_handled_in_linear_time(send, filler):
    text = filler * (60_000 // len(filler))
    body = {"message": text[:8000], "error": text[:8000], "stack": text[:30000], "context": {}}
    started = time.monotonic()
    assert send(body).status_code == 202
    assert time.monotonic() - started < 1.0
