"""No query parameter yields a 500 on the read endpoints and pages: random values of
the wrong type, range or shape for every parameter each one documents."""

from __future__ import annotations

import random

from tests.conftest import ndjson, record

VALUES = [
    "",
    "0",
    "-1",
    "99999999999999999999999",
    "1e309",
    "abc",
    "2026-13-45",
    "2026-04-21T05:12:34Z",
    "'",
    '"',
    "<script>",
    "%",
    "../..",
    "x" * 5000,
    "null",
    "[]",
    "1.5",
    " ",
    "llm.",
    "error",
    "slug",
    "day",
    "model",
    "p95",
    "csv",
    "jsonl",
    "desc",
    "1h",
    "7d",
]
URLS = {
    "/api/runs": [
        "slug",
        "status",
        "phase",
        "since",
        "until",
        "q",
        "cursor",
        "limit",
        "rig",
        "role",
    ],
    "/api/runs/r1": [],
    "/api/runs/r1/events": ["filter", "level", "after", "limit", "format", "role"],
    "/api/analytics/metrics": [
        "metricName",
        "aggregation",
        "slug",
        "project",
        "since",
        "until",
        "groupBy",
    ],
    "/api/analytics/export": [
        "metricName",
        "format",
        "limit",
        "since",
        "until",
        "order",
        "slug",
        "project",
    ],
    "/": ["slug", "status", "phase", "q", "cursor", "rig", "project", "since"],
    "/runs/r1": ["filter", "level", "after", "role", "project"],
    "/runs/r1/events.jsonl": ["filter", "level", "role"],
    "/errors": ["q", "status", "source", "project", "cursor", "level"],
    "/insights": ["window", "metric", "by", "project"],
    "/spans": ["window", "service", "order", "project"],
    "/status": [],
    "/compare/": ["a", "b"],
    "/traces/" + "ab" * 16: ["project", "span"],
    "/metrics": [],
    "/health": [],
}


def test_odd_query_parameters_never_yield_a_500(operator_client, token, post_events):
    post_events(
        ndjson(
            record("run.begin", run_id="r1"), record("llm.call", run_id="r1", trace_id="ab" * 16)
        )
    )
    rng = random.Random("params")
    bad = []
    for _ in range(200):
        url = rng.choice(list(URLS))
        params = {
            k: rng.choice(VALUES)
            for k in rng.sample(URLS[url], k=min(len(URLS[url]), rng.randint(0, 3)))
        }
        for headers in ({}, {"HTTP_AUTHORIZATION": f"Bearer {token}"}):
            response = operator_client.get(url, params, **headers)
            if response.status_code >= 500:
                bad.append((url, params, response.status_code))
            elif response.streaming:
                b"".join(response.streaming_content)  # errors while streaming count too
    assert not bad, bad[:10]
