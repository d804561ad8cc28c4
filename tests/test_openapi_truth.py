"""/api/openapi.json is true: every answer the server gives to a few bad inputs, for
every operation in the schema, is one the schema declares, and every refusal of the
ninja API has the one documented shape (`Detail`: a `detail` sentence)."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from django.test import Client

from runs.models import Run
from telemetry.models import ProjectLimits

NO_NUL = "^[^\\u0000]*$"
PLAIN = ("/v1/", "/health", "/metrics", "/api/{project_id}/")


@pytest.fixture
def schema(client, db) -> dict:
    return client.get("/api/openapi.json").json()


def operations(schema: dict):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method.upper(), operation


def url_of(path: str, values: dict[str, str], query: dict[str, str] | None = None) -> str:
    url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
    return url + ("?" + urlencode(query) if query else "")


def known(project) -> dict[str, str]:
    """Path values that name things that exist (or that a write may create)."""
    return {
        "run_id": "r1",
        "name": "a.txt",
        "group_id": "1",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "project_id": str(project.pk),
    }


def send(client: Client, method: str, url: str, token: str | None, body: bytes = b"{}"):
    extra = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    if method in ("POST", "PUT"):
        return client.generic(method, url, body, content_type="application/json", **extra)
    return client.generic(method, url, **extra)


def judge(path: str, method: str, operation: dict, response) -> None:
    declared = set(operation["responses"])
    status = str(response.status_code)
    assert status in declared, (
        f"{method} {path} answered {status}, declared {sorted(declared)}: {response.content[:200]}"
    )
    assert response.status_code < 500
    if status.startswith("4") and not path.startswith(PLAIN):
        body = response.json()
        assert isinstance(body.get("detail"), str) and body["detail"], (method, path, body)
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Detail"}, (method, path, status)


def bad_values(parameter: dict) -> list[str]:
    """Values the parameter's schema forbids, as the server should refuse them."""
    schemas = parameter["schema"].get("anyOf", [parameter["schema"]])
    values = []
    for schema in schemas:
        if schema.get("type") == "integer":
            values.append("abc")
            if "minimum" in schema:
                values.append(str(schema["minimum"] - 1))
            if "maximum" in schema:
                values.append(str(schema["maximum"] + 1))
        if schema.get("type") == "string":
            values.append("x\x00y")  # NO_NUL
            if "maxLength" in schema:
                values.append("x" * (schema["maxLength"] + 1))
            if "enum" in schema:
                values.append("zz-none-of-them")
            if schema.get("format") == "date-time":
                values.append("yesterday")
            pattern = schema.get("pattern")
            if pattern and pattern != NO_NUL and not re.fullmatch(pattern, "zz?"):
                values.append("zz?")
    return values


def test_the_schema_documents_one_shape_of_refusal(schema):
    detail = schema["components"]["schemas"]["Detail"]
    assert detail["required"] == ["detail"]
    assert detail["properties"]["detail"]["type"] == "string"


def test_every_operation_declares_400_and_every_secured_one_401(schema):
    for path, method, operation in operations(schema):
        assert "400" in operation["responses"], (method, path)
        if operation.get("security"):
            assert "401" in operation["responses"], (method, path)


def test_without_a_token_every_secured_operation_answers_a_declared_401(schema, project):
    client = Client()
    for path, method, operation in operations(schema):
        if not operation.get("security"):
            continue
        response = send(client, method, url_of(path, known(project)), token=None)
        assert response.status_code == 401, (method, path, response.status_code)
        judge(path, method, operation, response)


def test_every_parameter_refuses_what_its_schema_forbids_with_a_declared_400(
    schema, project, token
):
    client = Client()
    Run.objects.create(project=project, run_id="r1")
    checked = 0
    for path, method, operation in operations(schema):
        for parameter in operation.get("parameters", []):
            for value in bad_values(parameter):
                values, query = known(project), {}
                if parameter["in"] == "path":
                    values[parameter["name"]] = value.replace("\x00", "%00")
                else:
                    query[parameter["name"]] = value
                url = url_of(path, values, query)
                response = send(client, method, url, token)
                judge(path, method, operation, response)
                if parameter["in"] == "query" or method != "GET":
                    # A GET by an id the schema forbids finds nothing: 404 is true too.
                    assert response.status_code in (400, 404), (method, url, response.content)
                    if parameter["in"] == "query":
                        assert response.status_code == 400, (method, url, response.content)
                checked += 1
    assert checked > 60


def test_a_get_of_something_that_does_not_exist_answers_a_declared_404(schema, project, token):
    client = Client()
    missing = {
        "run_id": "no-such-run",
        "name": "none.txt",
        "group_id": "999999",
        "trace_id": "f" * 32,
        "project_id": "999999",
    }
    for path, method, operation in operations(schema):
        if method != "GET" or "{" not in path:
            continue
        assert "404" in operation["responses"], (method, path)
        response = send(client, method, url_of(path, missing), token)
        assert response.status_code == 404, (method, path, response.status_code)
        judge(path, method, operation, response)


def test_every_write_of_a_token_endpoint_declares_and_gives_429_with_retry_after(
    schema, project, token
):
    ProjectLimits.objects.create(project=project, ingest_per_minute=1)
    client = Client()
    writes = [
        (path, method, operation)
        for path, method, operation in operations(schema)
        if method in ("POST", "PUT") and operation.get("security")
    ]
    assert len(writes) >= 7
    send(client, "POST", "/api/runs/r1/heartbeat", token)  # the one write of the minute
    for path, method, operation in writes:
        response = send(client, method, url_of(path, known(project)), token)
        assert response.status_code == 429, (method, path, response.status_code)
        judge(path, method, operation, response)
        assert "Retry-After" in operation["responses"]["429"]["headers"], (method, path)
        assert int(response["Retry-After"]) >= 1


def test_an_empty_body_is_refused_where_the_schema_says_it_must_not_be_empty(
    schema, project, token
):
    client = Client()
    for path, method, operation in operations(schema):
        content = operation.get("requestBody", {}).get("content", {})
        ndjson = content.get("application/x-ndjson", {}).get("schema", {})
        if ndjson.get("minLength") != 1:
            continue
        url = url_of(path, known(project))
        response = client.generic(
            method, url, b"", "application/x-ndjson", HTTP_AUTHORIZATION=f"Bearer {token}"
        )
        assert response.status_code == 400, (method, path)
        judge(path, method, operation, response)


def test_a_nul_in_the_query_is_a_declared_400_on_every_operation(schema, project, token):
    client = Client()
    for path, method, operation in operations(schema):
        url = url_of(path, known(project)) + "?x=%00"
        response = send(client, method, url, token)
        assert response.status_code == 400, (method, path)
        judge(path, method, operation, response)
