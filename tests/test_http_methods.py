"""Methods: every page and endpoint refuses the ones it does not serve, TRACE included,
with 405, `Allow` and a JSON body."""

from __future__ import annotations

import pytest

PATHS = [
    "/",
    "/health",
    "/health/live",
    "/metrics",
    "/status",
    "/errors",
    "/errors/1",
    "/errors/1/status",
    "/projects/",
    "/runs/r1",
    "/runs/r1/events.jsonl",
    "/compare/",
    "/insights",
    "/spans",
    "/traces/0af7651916cd43dd8448eb211c80319c",
    "/login/",
    "/logout/",
    "/api/openapi.json",
    "/api/docs",
    "/api/runs",
    "/api/runs/r1",
    "/api/runs/r1/heartbeat",
    "/api/runs/r1/artifacts/a.txt",
    "/api/ingest/events",
    "/api/metrics/record",
    "/api/frontend-log",
    "/api/1/envelope/",
    "/v1/logs",
    "/v1/traces",
    "/static/runlens.css",
]


@pytest.mark.parametrize("path", PATHS)
def test_trace_is_refused_with_allow_everywhere(operator_client, path):
    response = operator_client.generic("TRACE", path)
    assert response.status_code == 405, response.content
    assert response["Allow"] and "TRACE" not in response["Allow"]
    assert response["Content-Type"].startswith("application/json")


def test_the_liveness_probe_answers_get_and_head_only(client):
    assert client.get("/health/live").status_code == 200
    assert client.head("/health/live").status_code == 200
    for method in ("POST", "PUT", "DELETE", "TRACE"):
        response = client.generic(method, "/health/live")
        assert response.status_code == 405
        assert response["Allow"] == "GET, HEAD"
        assert "use GET, HEAD" in response.json()["detail"]


def test_a_405_from_the_api_has_allow_and_a_json_body(client, token):
    response = client.delete("/api/ingest/events", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert "DELETE" in response.json()["detail"]
