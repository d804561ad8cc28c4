"""Sentry SDKs pointed at Runlens: the real sentry-sdk against a live portal, the seed's
bash client with curl, and malformed, hostile and duplicate envelopes."""

from __future__ import annotations

import gzip
import json
import subprocess
import uuid
import zlib

import brotli
import orjson
import pytest
import zstandard
from django.db import connection

from runs.models import Run
from telemetry.models import EnvelopeItemCount, ErrorGroup, ErrorReport, IngestBatch

# --- Helpers ------------------------------------------------------------------------


def envelope(*items: tuple[dict, bytes | dict], header: dict | None = None) -> bytes:
    """An envelope: a header line, then each item's header and payload (with `length`)."""
    lines = [orjson.dumps(header or {})]
    for item_header, payload in items:
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        lines += [orjson.dumps({**item_header, "length": len(body)}), body]
    return b"\n".join(lines) + b"\n"


def event(message: str = "boom", **fields) -> dict:
    return {"event_id": uuid.uuid4().hex, "message": message, "level": "error", **fields}


@pytest.fixture
def sentry_post(client, project, django_capture_on_commit_callbacks):
    """POST to a Sentry endpoint of our project with its key; the worker stores it."""

    def post(body: bytes, *, endpoint: str = "envelope", key: str | None = None, **headers):
        key = project.public_key if key is None else key
        extra = {"HTTP_" + n.upper().replace("-", "_"): v for n, v in headers.items()}
        if key:
            extra.setdefault("HTTP_X_SENTRY_AUTH", f"Sentry sentry_version=7, sentry_key={key}")
        path = headers.pop("path", None) or f"/api/{project.pk}/{endpoint}/"
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(path, body, content_type="application/x-sentry-envelope", **extra)

    return post


# --- Answers ------------------------------------------------------------------------


def test_an_envelope_is_answered_with_its_event_id_once_stored(sentry_post, project):
    sent = event("Deploy failed")
    response = sentry_post(
        envelope(({"type": "event"}, sent), header={"event_id": sent["event_id"]})
    )
    assert response.status_code == 200
    assert response.json() == {"id": sent["event_id"]}
    report = ErrorReport.objects.get()
    assert (report.source, report.event_id, report.project) == ("sentry", sent["event_id"], project)
    assert IngestBatch.objects.get().state == "done"


@pytest.mark.parametrize("path", ["/api/{pk}/envelope", "/api/{pk}/envelope/"])
def test_the_trailing_slash_is_optional(sentry_post, project, path):
    response = sentry_post(envelope(({"type": "event"}, event())), path=path.format(pk=project.pk))
    assert response.status_code == 200


def test_a_resent_event_id_is_stored_once(sentry_post):
    sent = event()
    for _ in range(3):
        assert sentry_post(envelope(({"type": "event"}, sent))).status_code == 200
    assert ErrorReport.objects.count() == 1
    assert ErrorGroup.objects.get().count == 1


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"not json\n", "envelope header is not JSON"),
        (b'{}\n{"type": "event", "length": 500}\n{}', "runs past the end"),
        (b'{}\n{"length": 2}\n{}', "`type` is required"),
        (b"{}\n[1]\n{}", "item 1 header is not a JSON object"),
        (b'{}\n{"type": "event"}\nnot json', "payload is not a JSON object"),
        (b"", "empty envelope"),
    ],
)
def test_a_malformed_envelope_is_a_400_naming_the_problem(sentry_post, body, detail):
    response = sentry_post(body)
    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert not IngestBatch.objects.exists()


def test_unknown_and_future_item_types_are_skipped_and_counted_never_fatal(sentry_post, project):
    sent = event()
    body = envelope(
        ({"type": "session"}, {"sid": "x", "status": "ok"}),
        ({"type": "client_report"}, {"discarded_events": []}),
        ({"type": "attachment", "filename": "a.txt"}, b"\x00\x01 binary \n with newline"),
        ({"type": "something_from_2030"}, b"??"),
        ({"type": "event"}, sent),
        ({"type": "session"}, {"sid": "y"}),
    )
    response = sentry_post(body)
    assert response.status_code == 200 and response.json() == {"id": sent["event_id"]}
    assert ErrorReport.objects.get().event_id == sent["event_id"]
    counts = dict(EnvelopeItemCount.objects.values_list("item_type", "count"))
    assert counts == {"session": 2, "client_report": 1, "attachment": 1, "something_from_2030": 1}


def test_items_without_length_run_to_the_next_newline(sentry_post):
    first, second = event("one"), event("two")
    body = b"\n".join(
        [b"{}", b'{"type":"event"}', orjson.dumps(first), b'{"type":"event"}', orjson.dumps(second)]
    )
    assert sentry_post(body).status_code == 200
    assert ErrorReport.objects.count() == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "", "UTF-8"])
def test_every_compression_an_sdk_uses_is_read(sentry_post, encoding):
    body = envelope(({"type": "event"}, event()))
    compress = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }.get(encoding, lambda b: b)
    response = sentry_post(compress(body), content_encoding=encoding)
    assert response.status_code == 200, response.content
    assert ErrorReport.objects.count() == 1


def test_a_decompression_bomb_is_a_413(sentry_post, settings):
    settings.SENTRY_MAX_BYTES = 1 << 20
    bomb = gzip.compress(b'{}\n{"type":"event"}\n' + b" " * (64 << 20))
    response = sentry_post(bomb, content_encoding="gzip")
    assert response.status_code == 413
    assert not IngestBatch.objects.exists()


# --- Credentials ----------------------------------------------------------------------


def test_the_key_may_come_from_the_query_string_or_the_envelope_dsn(sentry_post, project):
    body = envelope(({"type": "event"}, event()))
    answer = sentry_post(
        body,
        key="",
        path=f"/api/{project.pk}/envelope/?sentry_key={project.public_key}&sentry_version=7",
    )
    assert answer.status_code == 200
    body = envelope(({"type": "event"}, event()), header={"dsn": project.dsn})
    assert sentry_post(body, key="").status_code == 200
    assert ErrorReport.objects.count() == 2


def test_credentials_are_checked_against_the_project_of_the_url(sentry_post, project, stranger):
    other, _ = stranger
    body = envelope(({"type": "event"}, event()))
    assert sentry_post(body, key="").status_code == 401
    assert sentry_post(body, key="not-a-key").status_code == 403
    assert sentry_post(body, key=other.public_key).status_code == 403
    missing = sentry_post(body, path=f"/api/{other.pk + 1000}/envelope/")
    assert missing.status_code == 403
    foreign_dsn = envelope(({"type": "event"}, event()), header={"dsn": other.dsn})
    assert sentry_post(foreign_dsn, key="").status_code == 403
    assert not ErrorReport.objects.exists()


def test_over_the_rate_limit_it_answers_429_with_sentrys_headers(sentry_post, settings):
    settings.INGEST_RATE_PER_MINUTE = 2
    body = envelope(({"type": "event"}, event()))
    answers = [sentry_post(body) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    limited = answers[-1]
    seconds = int(limited["Retry-After"])
    assert 0 < seconds <= 65  # the sliding minute, counted in 5-second slots
    assert limited["X-Sentry-Rate-Limits"] == f"{seconds}::project:quota_exceeded"


def test_browsers_get_cors_for_the_projects_origins_only(sentry_post, project):
    project.allowed_origins = "https://app.example.com"
    project.save()
    body = envelope(({"type": "event"}, event()))
    allowed = sentry_post(body, origin="https://app.example.com")
    assert allowed.status_code == 200
    assert allowed["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "X-Sentry-Rate-Limits" in allowed["Access-Control-Expose-Headers"]
    refused = sentry_post(body, origin="https://evil.example.com")
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused


# --- What is stored -------------------------------------------------------------------


def test_the_seed_bash_payload_posted_with_curl_lands_next_to_its_run(
    live_server, project, settings
):
    settings.RUNLENS_URL = live_server.url
    run = Run.objects.create(project=project, run_id="gt-run-42", slug="owner__repo")
    payload = {
        "message": "Deploy failed",
        "level": "error",
        "timestamp": 1672743986,
        "tags": {
            "stage": "production",
            "run_id": "gt-run-42",
            "repo": "owner/repo",
            "pr_number": "123",
            "source": "workflow",
        },
        "user": {"id": "conv-1", "username": "octocat"},
        "extra": {"payload_source": "github", "stage": "production"},
    }
    auth = (
        f"Sentry sentry_key={project.public_key}, sentry_version=7, "
        "sentry_timestamp=1672743986, sentry_client=gittinkerer-cli/1.0"
    )
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{live_server.url}/api/{project.pk}/store",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"X-Sentry-Auth: {auth}",
            "--data-binary",
            json.dumps(payload),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer = json.loads(out.stdout)
    report = ErrorReport.objects.get()
    assert answer == {"id": report.event_id}
    assert report.run == run and report.source == "sentry"
    assert report.event["tags"]["repo"] == "owner/repo"
    assert report.event["user"]["username"] == "octocat"


def test_it_answers_503_with_retry_after_when_the_spool_cannot_be_written(sentry_post):
    # A real failure of the INSERT, raised by PostgreSQL itself.
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION refuse_batch() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
        )
        cursor.execute(
            "CREATE TRIGGER refuse_batch BEFORE INSERT ON telemetry_ingestbatch"
            " FOR EACH ROW EXECUTE FUNCTION refuse_batch()"
        )
    response = sentry_post(envelope(({"type": "event"}, event())))
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "retry later" in response.json()["detail"]
    assert not ErrorReport.objects.exists()


def test_the_openapi_schema_lists_both_endpoints(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    for endpoint in ("envelope", "store"):
        answers = paths[f"/api/{{project_id}}/{endpoint}/"]["post"]["responses"]
        assert {"200", "400", "401", "403", "413", "429", "503"} <= set(answers)
