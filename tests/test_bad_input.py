"""No input yields a 500: hostile and broken bodies get 4xx or are judged per line."""

from __future__ import annotations

import random

import pytest

from runs.models import Event
from tests.conftest import ndjson, record


def test_deeply_nested_json_array_body_is_a_400(post_events):
    response = post_events(b"[" * 5000 + b"]" * 5000, content_type="application/json")
    assert response.status_code == 400
    assert "JSON array" in response.json()["detail"]


def test_deeply_nested_line_is_rejected_or_bounded_never_fatal(post_events):
    body = (
        b'{"ts":"2026-04-21T05:12:34Z","event":"a.b","data":'
        + b'{"a":' * 3000
        + b"1"
        + b"}" * 3001
        + b"\n"
    )
    response = post_events(body + ndjson(record("a.ok")), run_id="r")
    assert response.status_code == 202
    assert response.json()["accepted"] == 1
    assert Event.objects.get().event == "a.ok"


def test_huge_numbers_and_odd_values_are_stored_or_rejected_cleanly(post_events):
    body = ndjson(
        record("a.bigint", data={"n": int("9" * 4000)}),
        record("a.float", data={"x": 1e308}),
        record("a.seq", seq=2**70),
        record("a.pid", pid="1234"),
        record("a.ts", ts=10**20),
        record("a.ts2", ts=True),
    )
    response = post_events(body, run_id="r")
    assert response.status_code == 202
    verdicts = {e["line"]: e["error"] for e in response.json()["errors"]}
    assert set(verdicts) == {3, 4, 5, 6}
    assert {e.event for e in Event.objects.all()} == {"a.bigint", "a.float"}
    big = Event.objects.get(event="a.bigint").data
    assert big["n"] == "9" * 64 + "…" and big["_truncated"] is True


def test_random_garbage_never_yields_a_500(post_events):
    rng = random.Random(20261122)
    pieces = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b":",
        b",",
        b"\\",
        b"\\u0000",
        b"\\ud800",
        b"\xff",
        b"\x00",
        b"\n",
        b"null",
        b"1e999",
        b'"ts"',
        b'"event"',
        b"\t",
        b" ",
    ]
    for _ in range(60):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 200)))
        for gz in (False, True):
            response = post_events(body, run_id="r", gzip_it=gz)
            assert response.status_code in (202, 400), (body, response.content)
            assert response.json()


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs?q=%00",
        "/api/runs?slug=a%00b",
        "/api/runs/a%00b",
        "/api/runs/a%00b/events",
        "/?q=%00",
        "/runs/a%00",
        "/errors?q=%00",
        "/api/analytics/metrics?metricName=%00",
    ],
)
def test_a_nul_character_in_the_url_is_a_400_not_a_500(operator_client, token, url):
    # PostgreSQL refuses NUL in text: it must never reach a filter.
    for headers in ({}, {"HTTP_AUTHORIZATION": f"Bearer {token}"}):
        response = operator_client.get(url, **headers)
        assert response.status_code == 400
        assert "NUL" in response.json()["detail"]


def test_a_chunked_body_the_server_did_not_decode_is_a_411_never_read_as_empty(client, token):
    # runserver (wsgiref) hands over chunked bodies undecoded; gunicorn decodes them
    # (tests/test_http_framing.py).
    for path in ("/api/ingest/events?run_id=r1", "/api/runs/r1/heartbeat", "/v1/logs"):
        response = client.post(
            path,
            b"{}",
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
            HTTP_TRANSFER_ENCODING="chunked",
        )
        assert response.status_code == 411, path
        assert "Content-Length" in response.json()["detail"]
