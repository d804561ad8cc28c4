"""The read API of errors, traces and artifacts (docs/errors.md, "Read API").

A small world: our project and a stranger's, each with error groups, reports, a trace
and a run with artifacts. The Sentry report is a real sentry-sdk event, captured
offline by a transport that keeps the envelope.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from runs.models import Artifact, Project, Run
from telemetry.models import ErrorGroup, ErrorReport, Span

T0 = datetime(2026, 4, 21, 5, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00"


def auth(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def sentry_event() -> dict:
    """A chained exception with tags, user and breadcrumbs, as sentry-sdk sends it."""
    captured: list[dict] = []

    class Capture(Transport):
        def capture_envelope(self, envelope):
            captured.extend(item.payload.json for item in envelope.items if item.type == "event")

    client = sentry_sdk.Client(
        dsn="http://public@localhost/1",
        transport=Capture,
        default_integrations=False,
        release="shop@1.2.0",
        environment="staging",
    )
    with sentry_sdk.isolation_scope() as scope:
        scope.set_client(client)
        scope.set_tag("run_id", "run-7")
        scope.set_user({"id": "u-1", "email": "a@example.com"})
        sentry_sdk.add_breadcrumb(category="http", message="GET /cart")
        try:
            try:
                {}["quantity"]
            except KeyError as exc:
                raise ValueError("bad quantity 42") from exc
        except ValueError as exc:
            sentry_sdk.capture_exception(exc)
    client.close()
    (event,) = captured
    return event


def group(project: Project, title: str, minutes: int = 0, **fields) -> ErrorGroup:
    seen = T0 + timedelta(minutes=minutes)
    return ErrorGroup.objects.create(
        project=project,
        fingerprint=title,
        title=title,
        first_seen=fields.pop("first_seen", seen - timedelta(hours=1)),
        last_seen=seen,
        count=fields.pop("count", 1),
        **fields,
    )


def report(of: ErrorGroup, minutes: int = 0, **fields) -> ErrorReport:
    return ErrorReport.objects.create(
        group=of,
        project=of.project,
        source=fields.pop("source", of.source),
        received_at=T0 + timedelta(minutes=minutes),
        **fields,
    )


def span(project: Project, span_id: str, start: int, **fields) -> Span:
    begin = T0 + timedelta(milliseconds=start)
    return Span.objects.create(
        project=project,
        trace_id=fields.pop("trace_id", TRACE),
        span_id=span_id,
        name=fields.pop("name", f"op {span_id[-1]}"),
        start_time=begin,
        end_time=begin + timedelta(milliseconds=5),
        duration_ms=5.0,
        **fields,
    )


@pytest.fixture
def world(project, stranger):
    their_project, _ = stranger
    run = Run.objects.create(project=project, run_id="run-7", slug="acme__shop")
    ours = group(project, "ValueError: bad quantity <n>", 10, source="sentry", culprit="cart")
    report(ours, 1, run=run, release="shop@1.1.0", environment="production", event_id="a" * 32)
    report(
        ours,
        9,
        event_id="b" * 32,
        release="shop@1.2.0",
        environment="staging",
        run=run,
        event=sentry_event(),
    )
    beacon = group(project, "TypeError: x is undefined", 5, culprit="render (app.js:3:7)")
    report(
        beacon,
        5,
        message="x is undefined",
        error="TypeError: x is undefined",
        stack="TypeError: x is undefined\n    at render (app.js:3:7)",
        context={"userAgent": "Firefox"},
        url="https://shop.example/cart",
        request_id="req-1",
    )
    theirs = group(their_project, "KeyError: 'sku'", 20)
    report(theirs, 20, release="shop@1.2.0")
    span(project, "00f067aa0ba902b7", 0, run=run, service="shop", attributes={"http.method": "GET"})
    span(project, "00f067aa0ba902b8", 2, parent_span_id="00f067aa0ba902b7", service="db")
    span(their_project, "00f067aa0ba902b9", 1)
    Artifact.store(run, "shot.png", PNG, "image/png")
    Artifact.store(run, "summary.md", "# Done ✓\n".encode(), "text/markdown")
    Artifact.store(run, "page.html", b"<script>alert(1)</script>", "text/html")
    return {"ours": ours, "beacon": beacon, "theirs": theirs, "run": run}


# --- Who sees what ---------------------------------------------------------------


def urls(world) -> list[str]:
    return [
        "/api/errors",
        f"/api/errors/{world['ours'].id}",
        f"/api/errors/{world['ours'].id}/events",
        f"/api/traces/{TRACE}",
        "/api/runs/run-7/artifacts/summary.md",
    ]


def test_our_token_reads_every_endpoint(client, token, world):
    for url in urls(world):
        assert client.get(url, **auth(token)).status_code == 200, url


def test_anonymous_reads_are_refused_with_a_json_detail(client, world):
    for url in urls(world):
        response = client.get(url)
        assert response.status_code == 401, url
        assert "token" in response.json()["detail"]


def test_a_strangers_token_sees_none_of_ours(client, stranger, world):
    their_token = stranger[1]
    listed = client.get("/api/errors", **auth(their_token)).json()["items"]
    assert [g["title"] for g in listed] == ["KeyError: 'sku'"]
    for url in urls(world)[1:]:
        response = client.get(url, **auth(their_token))
        if url.startswith("/api/traces/"):
            # The same trace id in their project: only their own span.
            assert [s["span_id"] for s in response.json()["spans"]] == ["00f067aa0ba902b9"]
        else:
            assert response.status_code == 404, url
            assert response.json()["detail"]


def test_our_token_gets_404_for_their_group(client, token, world):
    theirs = world["theirs"].id
    assert client.get(f"/api/errors/{theirs}", **auth(token)).status_code == 404
    assert client.get(f"/api/errors/{theirs}/events", **auth(token)).status_code == 404


def test_an_operator_sees_every_project(operator_client, world):
    titles = [g["title"] for g in operator_client.get("/api/errors").json()["items"]]
    assert titles == [
        "KeyError: 'sku'",
        "ValueError: bad quantity <n>",
        "TypeError: x is undefined",
    ]
    narrowed = operator_client.get("/api/errors?project=stranger").json()["items"]
    assert [g["title"] for g in narrowed] == ["KeyError: 'sku'"]
    assert operator_client.get(f"/api/errors/{world['theirs'].id}").status_code == 200
    spans = operator_client.get(f"/api/traces/{TRACE}").json()["spans"]
    assert len(spans) == 3
    acme = operator_client.get(f"/api/traces/{TRACE}?project=acme").json()["spans"]
    assert len(acme) == 2
    download = operator_client.get("/api/runs/run-7/artifacts/summary.md?project=acme")
    assert download.status_code == 200
    assert (
        operator_client.get("/api/runs/run-7/artifacts/summary.md?project=stranger").status_code
        == 404
    )


# --- Error groups ----------------------------------------------------------------


def test_it_lists_groups_last_seen_first_with_exactly_the_documented_fields(client, token, world):
    items = client.get("/api/errors", **auth(token)).json()["items"]
    assert [g["title"] for g in items] == [
        "ValueError: bad quantity <n>",
        "TypeError: x is undefined",
    ]
    assert items[0] == {
        "id": world["ours"].id,
        "title": "ValueError: bad quantity <n>",
        "culprit": "cart",
        "level": "error",
        "status": "unresolved",
        "count": 1,
        "first_seen": "2026-04-21T04:10:00Z",
        "last_seen": "2026-04-21T05:10:00Z",
        "source": "sentry",
    }


def test_it_pages_through_groups_with_next_cursor(client, token, project):
    # Two groups share a last_seen: the id breaks the tie, none is lost or repeated.
    for i in range(7):
        group(project, f"bug {i}", minutes=min(i, 5))
    seen, cursor, pages = [], "", 0
    while True:
        answer = client.get(f"/api/errors?limit=2&cursor={cursor}", **auth(token)).json()
        seen += [g["title"] for g in answer["items"]]
        pages += 1
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    assert pages == 4
    assert seen == ["bug 6", "bug 5", "bug 4", "bug 3", "bug 2", "bug 1", "bug 0"]


def test_it_filters_groups_by_query_status_level_and_source(client, token, project, world):
    group(project, "Deprecated call", 30, level="warn", culprit="legacy.py", status="ignored")

    def titles(query: str) -> list[str]:
        answer = client.get(f"/api/errors?{query}", **auth(token))
        assert answer.status_code == 200, answer.json()
        return [g["title"] for g in answer.json()["items"]]

    assert titles("query=QUANTITY") == ["ValueError: bad quantity <n>"]
    assert titles("query=app.js") == ["TypeError: x is undefined"]  # the culprit
    assert titles("status=ignored") == ["Deprecated call"]
    assert titles("status=unresolved") == [
        "ValueError: bad quantity <n>",
        "TypeError: x is undefined",
    ]
    assert titles("level=warn") == ["Deprecated call"]
    assert titles("source=sentry") == ["ValueError: bad quantity <n>"]
    assert titles("source=frontend") == ["Deprecated call", "TypeError: x is undefined"]


def test_it_keeps_groups_with_a_report_of_that_release_environment_or_run_once(
    client, token, world
):
    def titles(query: str) -> list[str]:
        return [
            g["title"] for g in client.get(f"/api/errors?{query}", **auth(token)).json()["items"]
        ]

    # Both reports of the group come from run-7: it is listed once, not twice.
    assert titles("run_id=run-7") == ["ValueError: bad quantity <n>"]
    assert titles("release=shop@1.1.0") == ["ValueError: bad quantity <n>"]
    assert titles("environment=staging") == ["ValueError: bad quantity <n>"]
    assert titles("release=shop@1.1.0&environment=staging") == []  # one report must match both
    assert titles("release=shop@9") == []
    assert titles("run_id=nope") == []


@pytest.mark.parametrize(
    "query",
    [
        "status=sleeping",
        "level=fatal",
        "source=carrier-pigeon",
        "cursor=abc",
        "cursor=12.x",
        "cursor=99999999999999999999999.1",
        "limit=0",
        "limit=5000",
    ],
)
def test_a_bad_filter_value_is_a_400_with_a_detail(client, token, world, query):
    response = client.get(f"/api/errors?{query}", **auth(token))
    assert response.status_code == 400
    assert response.json()["detail"]


def test_the_group_detail_has_the_latest_sentry_event_whole(client, token, world):
    answer = client.get(f"/api/errors/{world['ours'].id}", **auth(token)).json()
    assert answer["title"] == "ValueError: bad quantity <n>"
    latest = answer["latest"]
    stored = ErrorReport.objects.get(event_id="b" * 32).event
    for key, value in stored.items():
        if key not in ("event_id", "release", "environment"):
            assert latest[key] == value, key
    chain = [value["type"] for value in latest["exception"]["values"]]
    assert chain == ["KeyError", "ValueError"]
    assert latest["tags"]["run_id"] == "run-7"
    assert latest["user"]["email"] == "a@example.com"
    assert latest["breadcrumbs"]["values"][0]["message"] == "GET /cart"
    assert latest["event_id"] == "b" * 32
    assert latest["release"] == "shop@1.2.0"
    assert latest["run_id"] == "run-7"
    assert latest["received_at"] == "2026-04-21T05:09:00Z"


def test_the_latest_beacon_report_is_built_from_its_fields(client, token, world):
    latest = client.get(f"/api/errors/{world['beacon'].id}", **auth(token)).json()["latest"]
    assert latest == {
        "id": latest["id"],
        "source": "frontend",
        "level": "error",
        "message": "x is undefined",
        "error": "TypeError: x is undefined",
        "stack": "TypeError: x is undefined\n    at render (app.js:3:7)",
        "context": {"userAgent": "Firefox"},
        "url": "https://shop.example/cart",
        "request_id": "req-1",
        "event_id": "",
        "received_at": "2026-04-21T05:05:00Z",
        "release": "",
        "environment": "",
        "run_id": None,
    }


def test_a_group_without_reports_has_no_latest(client, token, project):
    lonely = group(project, "Old bug")
    assert client.get(f"/api/errors/{lonely.id}", **auth(token)).json()["latest"] is None


def test_a_missing_group_is_a_404_and_a_bad_id_a_400(client, token, world):
    assert client.get("/api/errors/999999", **auth(token)).status_code == 404
    assert client.get("/api/errors/abc", **auth(token)).status_code == 400


def test_it_pages_through_a_groups_reports_newest_first(client, token, project):
    bug = group(project, "bug")
    # Sentry reports are received at their event's time: ids are not in time order.
    for minutes in (3, 1, 4, 1, 5):
        report(bug, minutes, message=f"at {minutes}")
    seen, cursor = [], ""
    while True:
        answer = client.get(
            f"/api/errors/{bug.id}/events?limit=2&cursor={cursor}", **auth(token)
        ).json()
        seen += [(r["message"], r["id"]) for r in answer["items"]]
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    assert [message for message, _ in seen] == ["at 5", "at 4", "at 3", "at 1", "at 1"]
    assert seen[3][1] > seen[4][1]  # the tie broken by id, newest first
    assert len({pk for _, pk in seen}) == 5


def test_a_groups_reports_carry_release_environment_and_run(client, token, world):
    items = client.get(f"/api/errors/{world['ours'].id}/events", **auth(token)).json()["items"]
    assert [(r["event_id"], r["release"], r["environment"], r["run_id"]) for r in items] == [
        ("b" * 32, "shop@1.2.0", "staging", "run-7"),
        ("a" * 32, "shop@1.1.0", "production", "run-7"),
    ]
    assert items[0]["exception"]["values"][-1]["value"] == "bad quantity 42"
    assert (
        client.get(f"/api/errors/{world['ours'].id}/events?cursor=nope", **auth(token)).status_code
        == 400
    )


def test_reads_take_a_bounded_number_of_queries(
    client, token, project, world, django_assert_max_num_queries
):
    run = world["run"]
    for i in range(30):
        bug = group(project, f"bug {i}", i)
        report(bug, i, run=run, release="r1")
    # Token lookup, then one query per list; the detail adds its latest report.
    with django_assert_max_num_queries(2):
        client.get("/api/errors?release=r1&run_id=run-7&query=bug&limit=100", **auth(token))
    with django_assert_max_num_queries(3):
        client.get(f"/api/errors/{world['ours'].id}", **auth(token))
    with django_assert_max_num_queries(3):
        client.get(f"/api/errors/{world['ours'].id}/events", **auth(token))
    with django_assert_max_num_queries(2):
        client.get(f"/api/traces/{TRACE}", **auth(token))
    with django_assert_max_num_queries(3):
        client.get("/api/runs/run-7/artifacts/shot.png", **auth(token))


# --- Traces ----------------------------------------------------------------------


def test_a_trace_is_its_spans_by_start_time(client, token, world):
    answer = client.get(f"/api/traces/{TRACE.upper()}", **auth(token)).json()
    assert answer["trace_id"] == TRACE
    assert answer["truncated"] is False
    root, child = answer["spans"]
    assert root == {
        "span_id": "00f067aa0ba902b7",
        "parent_span_id": "",
        "name": "op 7",
        "kind": 0,
        "service": "shop",
        "start_time": "2026-04-21T05:00:00Z",
        "end_time": "2026-04-21T05:00:00.005Z",
        "duration_ms": 5.0,
        "status_code": 0,
        "status_message": "",
        "attributes": {"http.method": "GET"},
        "events": [],
        "run_id": "run-7",
    }
    assert child["parent_span_id"] == root["span_id"]
    assert child["run_id"] is None


def test_an_unknown_trace_is_a_404_and_a_bad_id_a_400(client, token, world):
    assert client.get(f"/api/traces/{'1' * 32}", **auth(token)).status_code == 404
    for bad in ("xyz", "0" * 32, "1" * 33):
        response = client.get(f"/api/traces/{bad}", **auth(token))
        assert response.status_code == 400, bad
        assert "trace_id" in response.json()["detail"]


# --- Artifacts -------------------------------------------------------------------


def test_it_downloads_a_binary_artifact_byte_for_byte(client, token, world):
    response = client.get("/api/runs/run-7/artifacts/shot.png", **auth(token))
    assert response.status_code == 200
    assert response.content == PNG
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == 'attachment; filename="shot.png"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["ETag"] == f'"{Artifact.objects.get(name="shot.png").sha256}"'


def test_it_downloads_a_text_artifact_as_an_attachment(client, token, world):
    response = client.get("/api/runs/run-7/artifacts/summary.md", **auth(token))
    assert response.content.decode() == "# Done ✓\n"
    assert response["Content-Type"] == "text/markdown"
    assert response["Content-Disposition"].startswith("attachment")


def test_an_html_artifact_keeps_its_type_but_cannot_run(client, token, world):
    response = client.get("/api/runs/run-7/artifacts/page.html", **auth(token))
    assert response["Content-Type"] == "text/html"
    assert response["Content-Disposition"] == 'attachment; filename="page.html"'
    assert response["Content-Security-Policy"] == "default-src 'none'; sandbox"


def test_an_unknown_artifact_or_run_is_a_404(client, token, world):
    assert client.get("/api/runs/run-7/artifacts/nope.txt", **auth(token)).status_code == 404
    assert client.get("/api/runs/nope/artifacts/shot.png", **auth(token)).status_code == 404


def test_a_put_artifact_reads_back_the_same(client, token, world):
    body = bytes(range(256)) * 4
    client.put(
        "/api/runs/run-9/artifacts/blob.bin",
        body,
        content_type="application/octet-stream",
        **auth(token),
    )
    response = client.get("/api/runs/run-9/artifacts/blob.bin", **auth(token))
    assert response.content == body
    assert response["Content-Type"] == "application/octet-stream"


# --- The schema ------------------------------------------------------------------


def test_openapi_documents_every_read_endpoint_and_its_errors(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    expected = {
        "/api/errors": {"200", "400", "401"},
        "/api/errors/{group_id}": {"200", "400", "401", "404"},
        "/api/errors/{group_id}/events": {"200", "400", "401", "404"},
        "/api/traces/{trace_id}": {"200", "400", "401", "404"},
        "/api/runs/{run_id}/artifacts/{name}": {"200", "401", "404"},
    }
    for path, codes in expected.items():
        answers = paths[path]["get"]["responses"]
        assert codes <= set(answers), (path, set(answers))
    item = paths["/api/errors"]["get"]["responses"]["200"]["content"]["application/json"]
    assert item["schema"]
    download = paths["/api/runs/{run_id}/artifacts/{name}"]["get"]["responses"]["200"]
    assert download["content"]["*/*"]["schema"]["format"] == "binary"
    assert "put" in paths["/api/runs/{run_id}/artifacts/{name}"]


def test_no_parameter_value_makes_a_500(client, token, operator_client, world):
    from tests.test_fuzz_reads import VALUES

    names = ["query", "status", "level", "source", "release", "environment", "run_id"]
    names += ["project", "cursor", "limit"]
    gid = world["ours"].id
    for value in [*VALUES, "-1.5", "1.99999999999999999", f"{10**15}.1", "1.1.1"]:
        for url in (f"/api/errors/{gid}/events", f"/api/traces/{TRACE}", "/api/errors"):
            for name in names:
                # `project` means something to operators only.
                if name == "project":
                    status = operator_client.get(url, {name: value}).status_code
                else:
                    status = client.get(url, {name: value}, **auth(token)).status_code
                assert status in (200, 400, 404), (url, name, value, status)
        for path in (f"/api/errors/{value}", f"/api/traces/{value}"):
            assert client.get(path, **auth(token)).status_code in (400, 404), path
