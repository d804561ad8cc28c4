from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
import zstandard

from runs.models import Event, Run
from telemetry.models import IngestBatch
from tests.conftest import ndjson, record


def test_it_accepts_gitoma_records_and_stores_them_in_order(post_events):
    body = ndjson(
        record("run.begin", data={"command": "run"}),
        record("phase.start", phase="WORKING", data={"phase": "WORKING"}),
        record("git.commit", phase="WORKING", data={"sha": "a1b2c3d", "files": ["README.md"]}),
    )
    response = post_events(body, run_id="r1")
    assert response.status_code == 202
    answer = response.json()
    assert answer["accepted"] == 3 and answer["rejected"] == 0 and answer["errors"] == []
    assert IngestBatch.objects.get(pk=answer["batch"]).state == "done"

    run = Run.objects.get(run_id="r1")
    events = list(run.events.order_by("seq").values_list("seq", "event"))
    assert events == [(1, "run.begin"), (2, "phase.start"), (3, "git.commit")]
    assert run.slug == "octocat__hello-world"
    assert run.phase == "WORKING"
    assert run.events_count == 3


def test_it_judges_lines_one_by_one_and_keeps_the_good_ones(post_events):
    body = ndjson(
        record("run.begin"),
        "not json at all",
        {"ts": "2026-04-21T05:12:34Z", "slug": "x"},
        record("llm.call", level="loud"),
        record("git.commit", data=[1, 2]),
        record("git.push", ts="yesterday"),
        record("run.exit_clean"),
    )
    response = post_events(body, run_id="r1")
    assert response.status_code == 202
    answer = response.json()
    assert answer["accepted"] == 2
    assert answer["rejected"] == 5
    assert [e["line"] for e in answer["errors"]] == [2, 3, 4, 5, 6]
    assert "invalid JSON" in answer["errors"][0]["error"]
    assert answer["errors"][1]["error"].startswith("event:")
    assert answer["errors"][2]["error"].startswith("level:")
    assert answer["errors"][3]["error"].startswith("data:")
    assert answer["errors"][4]["error"].startswith("ts:")
    assert Event.objects.count() == 2


def test_timestamps_with_any_offset_python_reads_are_stored_as_the_same_instant(post_events):
    # PostgreSQL refuses offsets beyond ±15:59: such a record once failed its whole
    # batch at COPY time, after the request had accepted it.
    body = ndjson(
        record("a.far_east", ts="2026-04-21T20:00:00+16:00"),
        record("a.plain", ts="2026-04-21T05:00:00.250+05:30"),
        record("a.edge", ts="9999-12-31T23:00:00-05:00"),
        record("a.epoch", ts=1_776_747_600),
    )
    response = post_events(body, run_id="r1")
    answer = response.json()
    assert (answer["accepted"], answer["rejected"]) == (3, 1)
    assert answer["errors"] == [{"line": 3, "error": "ts: year out of range"}]
    assert IngestBatch.objects.get(pk=answer["batch"]).state == "done"
    stored = dict(Event.objects.values_list("event", "ts"))
    assert stored["a.far_east"].isoformat() == "2026-04-21T04:00:00+00:00"
    assert stored["a.plain"].isoformat() == "2026-04-20T23:30:00.250000+00:00"
    assert stored["a.epoch"].isoformat() == "2026-04-21T05:00:00+00:00"


def test_it_accepts_a_json_array(post_events):
    body = json.dumps([record("run.begin"), record("run.exit_clean")]).encode()
    response = post_events(body, run_id="r1", content_type="application/json")
    assert response.status_code == 202
    assert response.json()["accepted"] == 2
    assert Event.objects.filter(run__run_id="r1").count() == 2


def test_it_accepts_gzip_and_deflate_bodies(
    post_events, client, token, django_capture_on_commit_callbacks
):
    assert post_events(ndjson(record("a.b")), run_id="g", gzip_it=True).status_code == 202
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/ingest/events?run_id=d",
            zlib.compress(ndjson(record("a.b"), record("a.c"))),
            content_type="application/x-ndjson",
            HTTP_AUTHORIZATION=f"Bearer {token}",
            HTTP_CONTENT_ENCODING="deflate",
        )
    assert response.status_code == 202, response.content
    assert Event.objects.filter(run__run_id="d").count() == 2


def test_a_record_run_id_wins_over_the_query_parameter(post_events):
    post_events(ndjson(record("a.b", run_id="own"), record("a.c")), run_id="param")
    assert Run.objects.get(run_id="own").events_count == 1
    assert Run.objects.get(run_id="param").events_count == 1


def test_records_without_run_id_follow_run_begin_of_their_slug(post_events):
    post_events(ndjson(record("run.begin"), record("phase.start", phase="PLANNING")))
    post_events(ndjson(record("llm.call", phase="PLANNING")))
    post_events(ndjson(record("run.begin"), record("git.commit")))
    runs = list(Run.objects.order_by("id"))
    assert len(runs) == 2
    assert runs[0].events_count == 3
    assert runs[1].events_count == 2


def test_seq_continues_across_batches_and_client_seq_is_kept(post_events):
    post_events(ndjson(record("a.1"), record("a.2")), run_id="r")
    post_events(ndjson(record("a.3"), record("a.10", seq=10), record("a.11")), run_id="r")
    seqs = list(Event.objects.order_by("seq").values_list("event", "seq"))
    assert seqs == [("a.1", 1), ("a.2", 2), ("a.3", 3), ("a.10", 10), ("a.11", 11)]


def test_the_same_idempotency_key_stores_the_request_once(post_events):
    body = ndjson(record("a.b"), record("a.c"))
    first = post_events(body, run_id="r", **{"Idempotency-Key": "abc-123"})
    second = post_events(body, run_id="r", **{"Idempotency-Key": "abc-123"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert Event.objects.count() == 2
    assert IngestBatch.objects.count() == 1


def test_gzip_body_is_limited_after_decompression(post_events, settings):
    settings.INGEST_MAX_BYTES = 10_000
    bomb = b"\n" * 5_000_000  # 5 MB of newlines, a few KB compressed
    response = post_events(bomb, run_id="r", gzip_it=True)
    assert response.status_code == 413
    assert "after decompression" in response.json()["detail"]
    assert IngestBatch.objects.count() == 0


def test_plain_body_over_the_limit_is_refused(post_events, settings):
    settings.INGEST_MAX_BYTES = 2_000
    response = post_events(ndjson(*[record("a.b")] * 30), run_id="r")
    assert response.status_code == 413


def test_bad_requests_get_clear_json_errors(post_events, stranger):
    cases = [
        (post_events(ndjson(record("a")), auth=""), 401),
        (post_events(ndjson(record("a")), auth="rl_wrong"), 401),
        (post_events(ndjson(record("a")), content_type="application/xml"), 415),
        (post_events(ndjson(record("a")), **{"Content-Encoding": "br-ish"}), 415),
        (post_events(b"   \n\n"), 400),
        (post_events(b"[1, 2"), 400),
        (post_events(b"{broken"), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.content
        assert "detail" in response.json() or "errors" in response.json()
    assert Event.objects.count() == 0


def test_undecodable_gzip_is_a_400(post_events, client, token):
    response = client.post(
        "/api/ingest/events",
        b"\x1f\x8b\x08\x00garbage" * 10,
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_CONTENT_ENCODING="gzip",
    )
    assert response.status_code == 400
    assert "gzip" in response.json()["detail"]


def test_a_gzip_body_of_several_members_is_read_to_the_end(
    client, token, django_capture_on_commit_callbacks
):
    # `cat monday.gz tuesday.gz`: gunzip reads both members, so must we, and the worker too.
    first = gzip.compress(ndjson(*[record("a.first", run_id="m")] * 3))
    second = gzip.compress(ndjson(*[record("a.second", run_id="m")] * 2))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/ingest/events",
            first + second,
            content_type="application/x-ndjson",
            HTTP_AUTHORIZATION=f"Bearer {token}",
            HTTP_CONTENT_ENCODING="gzip",
        )
    assert response.status_code == 202
    assert response.json()["accepted"] == 5
    names = list(Event.objects.order_by("seq").values_list("event", flat=True))
    assert names == ["a.first"] * 3 + ["a.second"] * 2


def test_garbage_after_a_gzip_member_is_a_400(client, token):
    data = gzip.compress(ndjson(record("a.b"))) + b"not gzip at all"
    response = client.post(
        "/api/ingest/events",
        data,
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_CONTENT_ENCODING="gzip",
    )
    assert response.status_code == 400
    assert Event.objects.count() == 0


@pytest.mark.parametrize("encoding", ["br", "zstd", "UTF-8", ""])
def test_every_content_encoding_an_sdk_sends_is_read(client, token, encoding):
    body = ndjson(record("a.b"), record("a.c"))
    if encoding == "br":
        body = brotli.compress(body)
    elif encoding == "zstd":
        body = zstandard.ZstdCompressor().compress(body)
    response = client.post(
        "/api/ingest/events?run_id=r",
        body,
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_CONTENT_ENCODING=encoding,
    )
    assert response.status_code == 202, response.content
    assert response.json()["accepted"] == 2


def test_truncated_gzip_is_a_400(client, token):
    data = gzip.compress(ndjson(*[record("a.b")] * 100))
    response = client.post(
        "/api/ingest/events",
        data[: len(data) // 2],
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_CONTENT_ENCODING="gzip",
    )
    assert response.status_code == 400


def test_nul_characters_and_invalid_utf8_are_cleaned_not_fatal(post_events):
    body = (
        b'{"ts":"2026-04-21T05:12:34Z","slug":"s","level":"info","event":"a.nul",'
        b'"message":"x\\u0000y","data":{"k\\u0000":"v\\u0000w"}}\n'
        b'{"ts":"2026-04-21T05:12:34Z","slug":"s","level":"info","event":"a.utf8",'
        b'"data":{"bad":"\xff\xfe ok"}}\n'
        b'{"ts":"2026-04-21T05:12:34Z","slug":"s","level":"info","event":"a.surrogate",'
        b'"data":{"lone":"\\ud800 x"}}\n'
    )
    response = post_events(body, run_id="r")
    assert response.json()["accepted"] == 3
    rows = {e.event: e for e in Event.objects.all()}
    assert rows["a.nul"].message == "xy"
    assert rows["a.nul"].data == {"k": "vw"}
    assert rows["a.utf8"].data["bad"] == "\ufffd\ufffd ok"
    assert rows["a.surrogate"].data["lone"] == "\ufffd x"


def test_deep_and_long_data_is_bounded_and_marked(post_events):
    deep: dict = {}
    node = deep
    for _ in range(60):
        node["d"] = {}
        node = node["d"]
    body = ndjson(
        record("a.deep", data={"tree": deep}),
        record("a.long", data={"blob": "x" * 100_000}),
    )
    post_events(body, run_id="r")
    rows = {e.event: e for e in Event.objects.all()}
    assert rows["a.deep"].data["_truncated"] is True
    assert "[too deep]" in json.dumps(rows["a.deep"].data)
    blob = rows["a.long"].data["blob"]
    assert len(blob) < 100_000 and blob.endswith("…")
    assert rows["a.long"].data["_truncated"] is True


def test_a_stranger_token_cannot_touch_our_run(post_events, stranger):
    _, their_token = stranger
    post_events(ndjson(record("a.b")), run_id="shared-name")
    post_events(ndjson(record("a.c")), run_id="shared-name", auth=their_token)
    assert Run.objects.filter(run_id="shared-name").count() == 2
    assert all(r.events_count == 1 for r in Run.objects.all())


def test_a_new_run_takes_its_slug_and_start_from_its_first_record(post_events):
    post_events(
        ndjson(
            record("run.begin", slug="octo__first", ts="2026-04-21T05:00:00Z"),
            record("run.exit_clean", slug="octo__other", ts="2026-04-21T05:01:00Z"),
        ),
        run_id="r",
    )
    run = Run.objects.get(run_id="r")
    assert run.slug == "octo__first"
    assert run.started_at.isoformat() == "2026-04-21T05:00:00+00:00"
