from __future__ import annotations

import json

from tests.conftest import ndjson, record


def auth(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def test_it_lists_runs_newest_first_with_keyset_pages(client, token, post_events):
    for i in range(5):
        post_events(ndjson(record("run.begin", slug=f"o__r{i}")), run_id=f"run-{i}")
    first = client.get("/api/runs?limit=2", **auth(token)).json()
    assert [r["run_id"] for r in first["items"]] == ["run-4", "run-3"]
    second = client.get(f"/api/runs?limit=2&cursor={first['next_cursor']}", **auth(token)).json()
    assert [r["run_id"] for r in second["items"]] == ["run-2", "run-1"]
    third = client.get(f"/api/runs?limit=2&cursor={second['next_cursor']}", **auth(token)).json()
    assert [r["run_id"] for r in third["items"]] == ["run-0"]
    assert third["next_cursor"] is None


def test_it_filters_runs(client, token, post_events):
    post_events(ndjson(record("run.begin", slug="a__x"), record("run.exit_clean")), run_id="done")
    post_events(ndjson(record("run.begin", slug="a__y", phase="WORKING")), run_id="live")

    def get(q):
        return [r["run_id"] for r in client.get(f"/api/runs?{q}", **auth(token)).json()["items"]]

    assert get("status=succeeded") == ["done"]
    assert get("status=running") == ["live"]
    assert get("slug=a__y") == ["live"]
    assert get("phase=WORKING") == ["live"]
    assert get("q=liv") == ["live"]
    assert get("since=2030-01-01T00:00:00Z") == []
    assert client.get("/api/runs?status=sleeping", **auth(token)).status_code == 400
    assert client.get("/api/runs?limit=5000", **auth(token)).status_code == 400


def test_times_with_offsets_postgresql_refuses_are_read_in_utc_not_a_500(
    client, token, post_events
):
    # Found by the API fuzzing (tests/test_api_contract.py): +20:31 is a time Python
    # reads and PostgreSQL refuses; it reached the query as sent and failed it.
    post_events(ndjson(record("run.begin", ts="2026-04-21T05:12:34Z")), run_id="r")
    since = client.get("/api/runs", {"since": "2026-04-21T23:00:00+20:31"}, **auth(token))
    assert since.status_code == 200
    assert [r["run_id"] for r in since.json()["items"]] == ["r"]  # 02:29 UTC, before it
    until = client.get("/api/runs", {"until": "0001-01-01T00:00:00+20:31"}, **auth(token))
    assert until.status_code == 400
    assert "year out of range" in until.content.decode()


def test_a_token_sees_only_its_own_projects_runs(client, token, stranger, post_events):
    post_events(ndjson(record("run.begin")), run_id="ours")
    _, their_token = stranger
    post_events(ndjson(record("run.begin")), run_id="theirs", auth=their_token)
    assert [r["run_id"] for r in client.get("/api/runs", **auth(token)).json()["items"]] == ["ours"]
    assert client.get("/api/runs/theirs", **auth(token)).status_code == 404
    assert client.get("/api/runs/theirs/events", **auth(token)).status_code == 404


def test_an_operator_sees_every_project(operator_client, token, stranger, post_events):
    post_events(ndjson(record("run.begin")), run_id="ours")
    post_events(ndjson(record("run.begin")), run_id="theirs", auth=stranger[1])
    items = operator_client.get("/api/runs").json()["items"]
    assert {r["run_id"] for r in items} == {"ours", "theirs"}
    assert (
        operator_client.get("/api/runs?project=stranger").json()["items"][0]["run_id"] == "theirs"
    )


def test_anonymous_reads_are_refused(client, post_events):
    post_events(ndjson(record("run.begin")), run_id="r")
    for url in ("/api/runs", "/api/runs/r", "/api/runs/r/events"):
        response = client.get(url)
        assert response.status_code == 401
        assert "token" in response.json()["detail"]


def test_run_detail_has_counters_and_lineage(client, token, post_events):
    post_events(ndjson(record("run.begin")), run_id="parent")
    post_events(
        ndjson(
            record("run.begin", data={"parent_run_id": "parent"}),
            record(
                "llm.call",
                data={
                    "model": "m",
                    "usage": {"input_tokens": 7, "output_tokens": 3},
                    "cost_usd": 0.25,
                },
            ),
            record("tool.error", level="error"),
            record("tool.slow", level="warn"),
        ),
        run_id="child",
    )
    child = client.get("/api/runs/child", **auth(token)).json()
    assert child["parent"] == "parent"
    assert child["counters"]["events"] == 4
    assert child["counters"]["errors"] == 1
    assert child["counters"]["warnings"] == 1
    assert child["counters"]["tokens_in"] == 7
    assert child["counters"]["tokens_out"] == 3
    assert child["counters"]["cost_usd"] == 0.25
    assert client.get("/api/runs/parent", **auth(token)).json()["forks"] == ["child"]


def test_events_page_by_seq_and_filter_by_namespace_and_level(client, token, post_events):
    post_events(
        ndjson(
            record("run.begin"),
            record("llm.call"),
            record("llm.retry", level="warn"),
            record("git.commit"),
            record("llm.call", level="error"),
        ),
        run_id="r",
    )
    url = "/api/runs/r/events"
    page = client.get(f"{url}?limit=2", **auth(token)).json()
    assert [e["seq"] for e in page["items"]] == [1, 2]
    rest = client.get(f"{url}?after={page['next_after']}", **auth(token)).json()
    assert [e["seq"] for e in rest["items"]] == [3, 4, 5]
    assert rest["next_after"] is None
    llm = client.get(f"{url}?filter=llm.", **auth(token)).json()["items"]
    assert [e["event"] for e in llm] == ["llm.call", "llm.retry", "llm.call"]
    warn_up = client.get(f"{url}?level=warn", **auth(token)).json()["items"]
    assert [e["level"] for e in warn_up] == ["warn", "error"]
    assert client.get(f"{url}?level=loud", **auth(token)).status_code == 400


def test_jsonl_export_is_exactly_the_gitoma_record(client, token, post_events):
    original = record(
        "git.commit", phase="WORKING", data={"sha": "a1b2c3d", "files": ["README.md"]}
    )
    post_events(ndjson(original), run_id="r")
    response = client.get("/api/runs/r/events?format=jsonl", **auth(token))
    assert response["Content-Type"] == "application/x-ndjson"
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == original


def test_jsonl_export_streams_more_than_one_page(client, token, post_events):
    post_events(ndjson(*[record("a.b", data={"i": i}) for i in range(4500)]), run_id="big")
    response = client.get("/api/runs/big/events?format=jsonl", **auth(token))
    lines = b"".join(response.streaming_content).splitlines()
    assert [json.loads(line)["data"]["i"] for line in lines] == list(range(4500))


def test_openapi_documents_every_endpoint(client):
    schema = client.get("/api/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/ingest/events",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/events",
        "/api/runs/{run_id}/heartbeat",
        "/api/metrics/record",
        "/api/analytics/metrics",
        "/api/analytics/export",
        # Plain Django views, documented alongside.
        "/v1/logs",
        "/v1/metrics",
        "/v1/traces",
        "/health",
        "/health/live",
        "/metrics",
    ):
        assert path in paths, path
    assert "application/x-protobuf" in paths["/v1/traces"]["post"]["requestBody"]["content"]
    assert "application/x-ndjson" in paths["/api/ingest/events"]["post"]["requestBody"]["content"]


def test_jsonl_and_json_give_back_numbers_jsonb_writes_wider_than_64_bits(
    client, token, post_events
):
    # Found by the round-trip property (tests/test_fuzz_receivers.py): PostgreSQL writes
    # 1e20 as 100000000000000000000, an integer orjson cannot write, and the export
    # stream broke off at it.
    line = b'{"ts":"2026-04-21T05:12:34Z","slug":"s","event":"a.b","data":{"n":1e20}}\n'
    assert post_events(line, run_id="wide").status_code == 202
    response = client.get("/api/runs/wide/events?format=jsonl", **auth(token))
    assert json.loads(b"".join(response.streaming_content))["data"] == {"n": 10**20}
    response = client.get("/api/runs/wide/events", **auth(token))
    assert response.status_code == 200
    assert response.json()["items"][0]["data"] == {"n": 10**20}
