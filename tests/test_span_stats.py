"""Per-span-name statistics: counts, error rates and percentiles computed by PostgreSQL.

The expected percentiles are worked out by hand with percentile_cont's definition:
for n sorted values v[0..n-1] and fraction f, the position is p = f·(n−1), and the
result is v[⌊p⌋] + (p − ⌊p⌋)·(v[⌊p⌋+1] − v[⌊p⌋]) (linear interpolation).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from telemetry.models import Span
from telemetry.traces import span_stats

NOW = datetime(2026, 4, 21, 12, 0, tzinfo=UTC)
_ids = iter(range(1, 10**6))


def add(project, name, duration, *, ago=timedelta(minutes=5), now=NOW, **fields):
    n = next(_ids)
    start = now - ago
    error = fields.pop("error", False)
    return Span.objects.create(
        project=project,
        trace_id=fields.pop("trace", "") or f"{n:032x}",
        span_id=f"{n:016x}",
        name=name,
        service=fields.pop("service", "api"),
        start_time=start,
        end_time=start + timedelta(milliseconds=duration),
        duration_ms=duration,
        status_code=Span.StatusCode.ERROR if error else Span.StatusCode.OK,
    )


def by_name(rows):
    return {row.name: row for row in rows}


def test_it_computes_percentiles_by_linear_interpolation(project):
    for duration in (40, 10, 100, 30, 20):  # sorted: 10 20 30 40 100
        add(project, "db.query", duration)
    row = by_name(span_stats("1h", now=NOW))["db.query"]
    assert row.count == 5
    assert row.p50 == pytest.approx(30)  # p = 2
    assert row.p95 == pytest.approx(88)  # p = 3.8: 40 + 0.8·60
    assert row.p99 == pytest.approx(97.6)  # p = 3.96: 40 + 0.96·60


def test_it_interpolates_between_two_values_for_an_even_count(project):
    for duration in (1, 2, 3, 4):
        add(project, "tool.call", duration)
    row = by_name(span_stats("1h", now=NOW))["tool.call"]
    assert row.p50 == pytest.approx(2.5)  # p = 1.5
    assert row.p95 == pytest.approx(3.85)  # p = 2.85: 3 + 0.85·1
    assert row.p99 == pytest.approx(3.97)  # p = 2.97


def test_a_single_span_is_every_percentile(project):
    add(project, "solo", 7.5)
    row = by_name(span_stats("1h", now=NOW))["solo"]
    assert (row.count, row.p50, row.p95, row.p99) == (1, 7.5, 7.5, 7.5)


def test_it_counts_errors_and_their_rate(project):
    for i in range(8):
        add(project, "llm.call", 100 + i, error=i < 2)
    row = by_name(span_stats("1h", now=NOW))["llm.call"]
    assert (row.count, row.errors) == (8, 2)
    assert row.error_rate == pytest.approx(0.25)
    assert row.error_pct == "25.0%"


def test_it_only_counts_spans_inside_the_window(project):
    add(project, "git.fetch", 10, ago=timedelta(minutes=30))
    add(project, "git.fetch", 20, ago=timedelta(hours=3))
    add(project, "git.fetch", 30, ago=timedelta(days=2))
    add(project, "git.fetch", 40, ago=timedelta(days=8))
    counts = {w: by_name(span_stats(w, now=NOW))["git.fetch"].count for w in ("1h", "24h", "7d")}
    assert counts == {"1h": 1, "24h": 2, "7d": 3}
    assert by_name(span_stats("24h", now=NOW))["git.fetch"].p50 == pytest.approx(15)


def test_it_filters_by_service_and_keeps_services_apart(project):
    add(project, "handle", 10, service="api")
    add(project, "handle", 50, service="worker")
    add(project, "handle", 70, service="worker")
    rows = span_stats("1h", now=NOW)
    assert sorted((r.service, r.count) for r in rows) == [("api", 1), ("worker", 2)]
    only = span_stats("1h", service="worker", now=NOW)
    assert [(r.service, r.count, r.p50) for r in only] == [("worker", 2, 60)]


def test_it_keeps_projects_apart(project, stranger):
    other, _ = stranger
    add(project, "handle", 10)
    add(other, "handle", 20)
    rows = span_stats("1h", now=NOW)
    assert sorted((r.project.slug, r.p50) for r in rows) == [("acme", 10), ("stranger", 20)]


def test_it_orders_by_p95_or_by_count(project):
    for _ in range(5):
        add(project, "busy", 1)
    add(project, "slow", 900)
    assert [r.name for r in span_stats("1h", now=NOW)] == ["slow", "busy"]
    assert [r.name for r in span_stats("1h", order="count", now=NOW)] == ["busy", "slow"]


def test_it_links_the_latest_trace_of_each_name(project):
    add(project, "plan", 5, ago=timedelta(minutes=40), trace="a" * 32)
    add(project, "plan", 5, ago=timedelta(minutes=2), trace="b" * 32)
    add(project, "plan", 5, ago=timedelta(minutes=20), trace="c" * 32)
    assert by_name(span_stats("1h", now=NOW))["plan"].latest_trace == "b" * 32


def test_it_computes_everything_in_two_queries(project, stranger, django_assert_num_queries):
    for i in range(30):
        add(project if i % 2 else stranger[0], f"name-{i % 6}", i)
    with django_assert_num_queries(2):  # the GROUP BY, then the projects shown
        rows = span_stats("1h", now=NOW)
        assert {r.project.slug for r in rows} == {"acme", "stranger"}


def test_the_page_shows_the_table_with_a_window_and_a_service_filter(operator_client, project):
    now = timezone.now()  # the page's window ends now
    add(project, "db.query", 10, now=now, service="api", trace="d" * 32)
    add(project, "db.query", 30, now=now, service="api", error=True, trace="d" * 32)
    add(project, "<b>bold</b>", 5, now=now, service="web")
    response = operator_client.get("/spans", {"window": "7d", "service": "api"})
    html = response.content.decode()
    assert response.status_code == 200
    assert "db.query" in html and "50.0%" in html
    assert "<b>bold</b>" not in html  # filtered out, and escaped anyway below
    assert f'href="/traces/{"d" * 32}?project=acme"' in html
    assert 'aria-current="true">last 7d' in html
    assert '<option value="web">web</option>' in html
    everything = operator_client.get("/spans").content.decode()
    assert "&lt;b&gt;bold&lt;/b&gt;" in everything and "<b>bold" not in everything


def test_the_page_ignores_odd_parameters(operator_client, db):
    response = operator_client.get("/spans", {"window": "5y", "order": "x", "service": "<nope>"})
    assert response.status_code == 200
    assert "No spans in the last 24h" in response.content.decode()


def test_the_page_needs_a_login(client, db):
    response = client.get("/spans")
    assert response.status_code == 302 and response["Location"].startswith("/login/")
