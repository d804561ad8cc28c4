"""GET /api/analytics/export: RFC 4180 CSV or JSON lines, streamed from a server-side cursor."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.http import StreamingHttpResponse

from runs import analytics
from runs.models import Run, RunMetric

T0 = datetime(2026, 1, 7, 14, 32, 15, tzinfo=UTC)


@pytest.fixture
def run(project) -> Run:
    return Run.objects.create(project=project, run_id="550e8400-e29b", slug="octocat__hello")


def add(project, name: str, value: float, minutes: int = 0, run: Run | None = None, **fields):
    return RunMetric.objects.create(
        project=project,
        run=run,
        name=name,
        value=value,
        recorded_at=T0 + timedelta(minutes=minutes),
        **fields,
    )


def export(client, token: str | None = None, **params):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.get("/api/analytics/export", params, **headers)


def rows_of(response) -> list[list[str]]:
    text = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(text, newline="")))


def test_it_streams_a_csv_attachment_with_the_gittinkerer_header(client, token, project, run):
    first = add(project, "duration_ms", 5432, run=run)
    add(project, "duration_ms", 0.25, minutes=1)
    response = export(client, token, metricName="duration_ms")
    assert response.status_code == 200
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="metrics-duration_ms.csv"'
    assert rows_of(response) == [
        ["id", "run_id", "metric_name", "metric_value", "recorded_at"],
        [str(first.pk), "550e8400-e29b", "duration_ms", "5432", "2026-01-07T14:32:15.000Z"],
        [str(first.pk + 1), "", "duration_ms", "0.25", "2026-01-07T14:33:15.000Z"],
    ]


def test_lines_end_in_crlf_and_awkward_text_is_quoted(client, token, project, run):
    add(project, 'a,b "quoted"\nnext line', 1, run=run)
    response = export(client, token)
    raw = b"".join(response.streaming_content)
    assert raw.startswith(b"id,run_id,metric_name,metric_value,recorded_at\r\n")
    assert b'"a,b ""quoted""\nnext line"' in raw
    (_, row) = list(csv.reader(io.StringIO(raw.decode(), newline="")))
    assert row[2] == 'a,b "quoted"\nnext line'


def test_formula_like_text_is_neutralised_but_negative_numbers_stay_numbers(client, token, project):
    names = ['=HYPERLINK("http://x")', "+1+1", "-2-2", "@SUM(A1)", "\tcmd", "\rcmd", "ok=1"]
    for i, name in enumerate(names):
        add(project, name, -3.5, minutes=i)
    formula_run = Run.objects.create(project=project, run_id="=1+1")
    add(project, "safe", 1, minutes=10, run=formula_run)
    rows = rows_of(export(client, token))[1:]
    assert [r[2] for r in rows] == ["'" + n for n in names[:-1]] + ["ok=1", "safe"]
    assert {r[3] for r in rows[:-1]} == {"-3.5"}
    assert rows[-1][1] == "'=1+1"


def test_limit_since_until_and_order_pick_the_window(client, token, project):
    for i in range(10):
        add(project, "tokens_in", i, minutes=i)
    add(project, "other", 99, minutes=3)

    def values(**params):
        return [r[3] for r in rows_of(export(client, token, metricName="tokens_in", **params))[1:]]

    assert values() == [str(i) for i in range(10)]
    assert values(limit=3) == ["0", "1", "2"]
    since = (T0 + timedelta(minutes=4)).isoformat()
    assert values(since=since, limit=2) == ["4", "5"]
    assert values(since=since, until=(T0 + timedelta(minutes=6)).isoformat()) == ["4", "5"]
    assert values(order="desc", limit=2) == ["9", "8"]


def test_the_jsonl_variant_has_one_object_per_line(client, token, project, run):
    add(project, "cost_usd", 0.5, run=run, unit="USD", labels={"model": "m1"})
    add(project, "cost_usd", 1.5, minutes=1)
    response = export(client, token, metricName="cost_usd", format="jsonl")
    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "application/x-ndjson"
    assert response["Content-Disposition"] == 'attachment; filename="metrics-cost_usd.jsonl"'
    lines = b"".join(response.streaming_content).decode().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["run_id"] == "550e8400-e29b" and second["run_id"] is None
    assert first["metric_value"] == 0.5 and first["unit"] == "USD"
    assert first["labels"] == {"model": "m1"}
    assert first["recorded_at"] == "2026-01-07T14:32:15.000Z"


def test_the_file_name_cannot_be_broken_by_the_metric_name(client, token, project):
    response = export(client, token, metricName='a"; filename="evil.exe')
    assert response["Content-Disposition"] == 'attachment; filename="metrics-a-filenameevilexe.csv"'


def test_a_token_exports_only_its_project_and_an_operator_every_one(
    client, token, stranger, project, operator_client
):
    add(project, "duration_ms", 1)
    their_project, their_token = stranger
    add(their_project, "duration_ms", 2)
    assert [r[3] for r in rows_of(export(client, token))[1:]] == ["1"]
    assert [r[3] for r in rows_of(export(client, their_token))[1:]] == ["2"]
    assert [r[3] for r in rows_of(export(operator_client))[1:]] == ["1", "2"]
    assert [r[3] for r in rows_of(export(operator_client, project="stranger"))[1:]] == ["2"]
    assert export(client).status_code == 401


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"format": "xlsx"}, "format: must be csv or jsonl"),
        ({"order": "random"}, "order: must be asc or desc"),
        ({"since": "soon"}, "since: not an ISO 8601 timestamp"),
        ({"project": "\x00"}, "the URL contains a NUL character (%00): remove it"),
    ],
)
def test_bad_parameters_get_a_400(client, token, project, params, detail):
    response = export(client, token, **params)
    assert response.status_code == 400
    assert response.json()["detail"] == detail
    assert export(client, token, limit=0).status_code == 400
    assert export(client, token, limit=10**30).status_code == 400  # never a 500 from LIMIT


def test_rows_come_from_a_server_side_cursor_a_chunk_at_a_time(client, token, project):
    total = analytics.EXPORT_CHUNK * 2 + 7
    RunMetric.objects.bulk_create(
        RunMetric(project=project, name="n", value=i, recorded_at=T0) for i in range(total)
    )
    chunks = iter(export(client, token, metricName="n").streaming_content)
    header, first = next(chunks), next(chunks)
    assert header.startswith(b"id,")
    assert first.count(b"\r\n") == analytics.EXPORT_CHUNK
    # Mid-stream, the rest of the rows wait in PostgreSQL, not in this process.
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors WHERE name LIKE '_django_curs_%%'")
        assert cursor.fetchone()[0] == 1
    rest = b"".join(chunks)
    assert rest.count(b"\r\n") == total - analytics.EXPORT_CHUNK
