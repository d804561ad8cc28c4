"""What /api/openapi.json says beyond what ninja infers: every answer the server gives.

ninja documents an operation's declared responses only. The rules below add the
answers that come from layers around the view, so that the schema is true for every
operation at once, those to come included (tests/test_openapi_truth.py walks them):

- 400 everywhere: a NUL character anywhere in the URL (portal.middleware), a parameter
  or body that does not validate, or what the view refuses.
- 401 where a token (or an operator's session) is required.
- 404 for a GET of one resource by its id.
- 411, 413 where a request body is read: a chunked body the server cannot decode,
  a body past its limit.
- 429 with Retry-After on write operations of the token endpoints (the project's
  rate limit, counted before the body is read).
- 503 with Retry-After everywhere: the database cannot be reached (a restart, a
  failover); docs/reliability.md.

Every 4xx (and 503) body of the API has one shape, `Detail`: `{"detail": "<what is wrong>"}`,
with `errors` listing each problem when there are several (a parameter's validation,
an ingest batch's lines).
"""

from __future__ import annotations

from typing import Any

DETAIL_SCHEMA = {
    "title": "Detail",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string", "description": "What is wrong, for a person to read."},
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Each problem when there are several: a parameter's "
            "validation errors (`loc`, `msg`, `type`), an ingest batch's rejected lines "
            "(`line`, `error`) or items (`index`, `error`).",
        },
    },
}
DETAIL = {"$ref": "#/components/schemas/Detail"}

RATE_HEADERS = {
    "Retry-After": {
        "description": "Seconds until a request would be let through again.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "X-RateLimit-Limit": {
        "description": "Write requests allowed per sliding minute.",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {"schema": {"type": "integer", "minimum": 0}},
}

UNAVAILABLE_RETRY_AFTER = {
    "description": "Seconds to wait before sending the same request again.",
    "schema": {"type": "integer", "minimum": 1},
}

STANDARD: dict[str, str] = {
    "400": "Malformed request: a parameter or body that does not validate, a NUL "
    "character in the URL, or what the endpoint refuses; `detail` says which.",
    "401": "Missing or invalid token: send `Authorization: Bearer <ingest token>` "
    "(reads also accept a signed-in operator).",
    "404": "Not found, or not visible to this token.",
    "411": "A chunked body this server cannot decode (a server other than gunicorn): "
    "send Content-Length.",
    "413": "The body is larger than the endpoint's limit (after decompression).",
    "429": "The project's write rate limit (`INGEST_RATE_PER_MINUTE` or its own); "
    "retry after `Retry-After` seconds.",
    "503": "The database is unavailable (restarting, failing over): nothing was kept; "
    "retry after `Retry-After` seconds with the same `Idempotency-Key`.",
}

# The NUL refusal of portal.middleware.RefuseNulInUrlMiddleware, as a JSON Schema regex.
NO_NUL = "^[^\\u0000]*$"


def complete(schema: dict[str, Any], plain_paths: set[str]) -> dict[str, Any]:
    """Add the answers and constraints every ninja operation really has."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Detail"] = DETAIL_SCHEMA
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in plain_paths:
                _complete_plain(operation)
            else:
                _complete_operation(method.upper(), operation)
    return schema


def _complete_plain(operation: dict[str, Any]) -> None:
    """Plain views (OTLP, Sentry, probes) document their own answers, in their own
    shapes (OTLP's google.rpc.Status); only what the layers around them add is added."""
    responses = operation.setdefault("responses", {})
    responses.setdefault("400", {"description": STANDARD["400"]})
    if "requestBody" in operation:
        responses.setdefault("411", {"description": STANDARD["411"]})
    if "429" in responses:
        responses["429"].setdefault("headers", {"Retry-After": RATE_HEADERS["Retry-After"]})
    for parameter in operation.get("parameters", []):
        _refuse_nul(parameter.get("schema", {}))


def _complete_operation(method: str, operation: dict[str, Any]) -> None:
    # ninja keys responses by int: one key type, or "400" and 400 would both appear.
    responses = {str(status): answer for status, answer in operation.get("responses", {}).items()}
    operation["responses"] = responses
    secured = bool(operation.get("security"))
    writes = method not in ("GET", "HEAD", "OPTIONS")
    has_body = "requestBody" in operation
    wanted = ["400"]
    if secured:
        wanted.append("401")
    path_params = [p for p in operation.get("parameters", []) if p["in"] == "path"]
    if method == "GET" and path_params:
        wanted.append("404")
    if has_body:
        wanted += ["411", "413"]
    if secured and writes:
        wanted.append("429")
    wanted.append("503")
    for status in wanted:
        responses.setdefault(status, {"description": STANDARD[status]})
    if "429" in responses and secured and writes:
        responses["429"].setdefault("headers", RATE_HEADERS)
    if "503" in responses:
        responses["503"].setdefault("headers", {"Retry-After": UNAVAILABLE_RETRY_AFTER})
    for status, response in responses.items():
        if str(status).startswith("4") or str(status) == "503":
            # One shape for every refusal, whatever ninja inferred from the view.
            response["content"] = {"application/json": {"schema": DETAIL}}
            if response.get("description") in ("", "Bad Request", "Unauthorized", None):
                response["description"] = STANDARD.get(str(status), "")
    for parameter in operation.get("parameters", []):
        _refuse_nul(parameter.get("schema", {}))


def _refuse_nul(schema: dict[str, Any]) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string" and "pattern" not in option:
            option["pattern"] = NO_NUL
