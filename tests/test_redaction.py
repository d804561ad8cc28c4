"""Secrets never reach the database (SPEC §3)."""

from __future__ import annotations

import json

from runs.models import Event
from tests.conftest import ndjson, record


def stored(post_events, **fields) -> Event:
    post_events(ndjson(record("a.b", **fields)), run_id="r")
    return Event.objects.get()


def test_secret_keys_are_redacted_at_any_depth(post_events):
    event = stored(
        post_events,
        data={
            "password": "hunter2",
            "github_token": "ghp_x",
            "nested": {"api_key": "k", "Authorization": "Bearer abc", "client_secret": "s"},
            "list": [{"private_key": "-----BEGIN"}, {"credentials": {"user": "u"}}],
            "tokens_in": 12,
            "max_tokens": 400,
        },
    )
    data = event.data
    assert data["password"] == data["github_token"] == "[redacted]"
    assert data["nested"] == {
        "api_key": "[redacted]",
        "Authorization": "[redacted]",
        "client_secret": "[redacted]",
    }
    assert data["list"] == [{"private_key": "[redacted]"}, {"credentials": "[redacted]"}]
    assert (data["tokens_in"], data["max_tokens"]) == (12, 400)


def test_secrets_inside_strings_are_redacted(post_events):
    event = stored(
        post_events,
        message="cloning https://octocat:s3cret@github.com/o/r.git with Bearer eyJhbGciOi.x.y",
        data={
            "cmd": "curl -H 'Authorization: Bearer abc.def' https://api",
            "out": "token ghp_" + "a" * 36 + " and sk-" + "b" * 40,
        },
    )
    text = event.message + json.dumps(event.data)
    for secret in ("s3cret", "eyJhbGciOi", "abc.def", "a" * 36, "b" * 40):
        assert secret not in text
    assert "https://[redacted]@github.com/o/r.git" in event.message
    assert "Bearer [redacted]" in event.message


def test_ordinary_data_is_left_alone(post_events):
    data = {"sha": "a1b2c3d", "files": ["README.md"], "url": "https://github.com/o/r"}
    assert stored(post_events, data=data).data == data


def test_redaction_stays_linear_on_hostile_strings(post_events):
    import time

    hostile = "a" * 30_000 + "bearer " + "b" * 30_000 + " https://" + "c" * 2000
    started = time.monotonic()
    event = stored(post_events, data={"password_hint": hostile, "s": "x" + "a" * 60_000})
    assert time.monotonic() - started < 2.0
    assert event.data["s"].endswith("…")


def test_secrets_spelled_with_json_escapes_are_redacted_too(post_events):
    # `pass\u0077ord` decodes to `password`; the raw line shows neither the key nor
    # `Bearer`, so the quick test on the raw line must not wave it through.
    body = (
        b'{"ts":"2026-04-21T05:12:34Z","slug":"s","level":"info","event":"a.b",'
        b'"message":"\\u0042earer abc.def","data":{"pass\\u0077ord":"hunter2",'
        b'"api\\u005fkey":"k-123"}}\n'
    )
    post_events(body, run_id="r")
    event = Event.objects.get()
    assert event.data == {"password": "[redacted]", "api_key": "[redacted]"}
    assert event.message == "Bearer [redacted]"


# --- The scrubber's shortcuts ---------------------------------------------------------


def test_the_cheap_test_never_skips_text_the_secret_pattern_would_redact():
    import random

    from telemetry.ingest.redaction import SECRET_VALUE, may_hold_secret

    rng = random.Random(12)
    pieces = [
        "Bearer ", "BASIC ", "bearer\t", "https://", "git+ssh://", "u:p@", "@", "ghp_",
        "GHS_", "gHr_", "sk-", "SK-", "x" * 20, "A1b2" * 6, " ", "/", "-", "_", "é", "ok",
    ]  # fmt: skip
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        if text.isascii() and SECRET_VALUE.search(text):
            assert may_hold_secret(text), text


def test_a_key_first_seen_without_redaction_is_still_redacted_by_the_walk():
    from telemetry.ingest.redaction import REDACTED, Scrubber

    assert Scrubber(redact=False).walk({"db_password": "hunter2"}) == {"db_password": "hunter2"}
    assert Scrubber(redact=True).walk({"db_password": "hunter2"}) == {"db_password": REDACTED}


def test_text_that_is_not_ascii_is_still_searched_for_secrets():
    from telemetry.ingest.redaction import REDACTED, Scrubber

    cleaned = Scrubber().walk({"note": "clé: Bearer abc.def"})
    assert cleaned == {"note": f"clé: Bearer {REDACTED}"}
