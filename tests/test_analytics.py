"""GET /api/analytics/metrics: aggregates computed in PostgreSQL, checked against
values computed by hand with the statistics module."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime

import pytest

from runs import analytics
from runs.models import Run, RunMetric

# (run, value, day, model) of our duration_ms points; None run = a fleet metric.
POINTS = [
    ("a1", 100.0, 1, "m1"),
    ("a1", 200.0, 1, "m1"),
    ("a2", 300.0, 1, "m2"),
    ("b1", 400.0, 2, "m2"),
    ("b1", 1000.0, 2, None),
    (None, 50.0, 2, None),
]
VALUES = [p[1] for p in POINTS]


def day(n: int, hour: int = 12) -> datetime:
    return datetime(2026, 1, n, hour, tzinfo=UTC)


@pytest.fixture
def world(project, stranger):
    runs = {
        "a1": Run.objects.create(project=project, run_id="a1", slug="acme__api"),
        "a2": Run.objects.create(project=project, run_id="a2", slug="acme__api"),
        "b1": Run.objects.create(project=project, run_id="b1", slug="acme__web"),
    }
    rows = [
        RunMetric(
            project=project,
            run=runs[run] if run else None,
            name="duration_ms",
            value=value,
            unit="ms",
            labels={"model": model} if model else {},
            recorded_at=day(n, hour=10 + i),
        )
        for i, (run, value, n, model) in enumerate(POINTS)
    ]
    rows.append(
        RunMetric(project=project, run=runs["a1"], name="tokens_in", value=7, recorded_at=day(1))
    )
    their_project, _ = stranger
    their_run = Run.objects.create(project=their_project, run_id="a1", slug="acme__api")
    rows.append(
        RunMetric(
            project=their_project,
            run=their_run,
            name="duration_ms",
            value=99999,
            recorded_at=day(1),
        )
    )
    RunMetric.objects.bulk_create(rows)
    return runs


def get(client, token: str | None = None, **params):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.get("/api/analytics/metrics", {"metricName": "duration_ms", **params}, **headers)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("sum", sum(VALUES)),
        ("avg", statistics.mean(VALUES)),
        ("min", min(VALUES)),
        ("max", max(VALUES)),
        ("count", len(VALUES)),
        ("stddev", statistics.stdev(VALUES)),
        ("p50", statistics.median(VALUES)),
        # percentile_cont interpolates like the "inclusive" method.
        ("p95", statistics.quantiles(VALUES, n=100, method="inclusive")[94]),
        ("p99", statistics.quantiles(VALUES, n=100, method="inclusive")[98]),
    ],
)
def test_it_computes_each_aggregation_like_the_statistics_module(
    client, token, world, aggregation, expected
):
    response = get(client, token, aggregation=aggregation)
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["metric"] == "duration_ms" and answer["aggregation"] == aggregation
    assert answer["value"] == pytest.approx(expected)
    assert (answer["count"], answer["min"], answer["max"]) == (6, 50, 1000)


def test_it_averages_by_default(client, token, world):
    assert get(client, token).json()["value"] == pytest.approx(statistics.mean(VALUES))


def test_it_groups_by_slug_with_fleet_metrics_last(client, token, world):
    groups = get(client, token, aggregation="sum", groupBy="slug").json()
    assert [(g["group"], g["value"], g["count"]) for g in groups] == [
        ("acme__api", 600, 3),
        ("acme__web", 1400, 2),
        (None, 50, 1),
    ]
    assert all(g["metric"] == "duration_ms" and g["aggregation"] == "sum" for g in groups)
    web = groups[1]
    assert (web["min"], web["max"]) == (400, 1000)


def test_it_groups_by_day_in_utc(client, token, world):
    groups = get(client, token, aggregation="p50", groupBy="day").json()
    assert [(g["group"], g["value"]) for g in groups] == [
        ("2026-01-01", statistics.median([100, 200, 300])),
        ("2026-01-02", statistics.median([400, 1000, 50])),
    ]


def test_it_groups_by_the_model_label(client, token, world):
    groups = get(client, token, aggregation="stddev", groupBy="model").json()
    assert [(g["group"], g["count"]) for g in groups] == [("m1", 2), ("m2", 2), (None, 2)]
    assert groups[0]["value"] == pytest.approx(statistics.stdev([100, 200]))
    assert groups[1]["value"] == pytest.approx(statistics.stdev([300, 400]))


def test_it_narrows_by_slug_and_time_window(client, token, world):
    assert get(client, token, aggregation="count", slug="acme__web").json()["value"] == 2
    # since inclusive, until exclusive; epoch seconds work as well as ISO 8601.
    window = {"since": day(1, 11).isoformat(), "until": str(day(2, 14).timestamp())}
    answer = get(client, token, aggregation="sum", **window).json()
    assert answer["value"] == 200 + 300 + 400  # 11:00 included, 14:00 excluded
    assert get(client, token, aggregation="count", since="2026-01-02").json()["count"] == 3


def test_nothing_matching_gives_null_values_and_a_zero_count(client, token, world):
    answer = get(client, token, metricName="never_sent", aggregation="p95").json()
    assert answer == {
        "metric": "never_sent",
        "aggregation": "p95",
        "value": None,
        "count": 0,
        "min": None,
        "max": None,
    }
    one = get(client, token, aggregation="stddev", slug="acme__api", until="2026-01-01T10:30Z")
    assert one.json()["value"] is None and one.json()["count"] == 1
    assert get(client, token, groupBy="slug", slug="nobody").json() == []


def test_a_token_sees_only_its_own_project(client, token, stranger, world):
    _, their_token = stranger
    theirs = get(client, their_token, aggregation="max").json()
    assert (theirs["value"], theirs["count"]) == (99999, 1)
    ours = get(client, token, aggregation="max", project="stranger").json()
    assert ours["value"] == 1000  # the project filter is for operators only


def test_an_operator_sees_every_project_and_can_pick_one(operator_client, world):
    assert get(operator_client, aggregation="count").json()["value"] == 7
    assert get(operator_client, aggregation="max", project="stranger").json()["value"] == 99999
    assert get(operator_client, aggregation="count", project="acme").json()["value"] == 6


def test_anonymous_reads_are_refused(client, world):
    assert get(client).status_code == 401


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"aggregation": "median"}, "aggregation: must be one of sum, avg"),
        ({"groupBy": "week"}, "groupBy: must be one of slug, day, model"),
        ({"since": "last tuesday"}, "since: not an ISO 8601 timestamp"),
        ({"until": "2026-13-45"}, "until: not an ISO 8601 timestamp"),
        ({"since": "1e20"}, "since: epoch value out of range"),
        ({"slug": "a\x00b"}, "the URL contains a NUL character"),  # the middleware
        ({"metricName": "x\x00"}, "the URL contains a NUL character"),
    ],
)
def test_bad_parameters_get_a_400_naming_them(client, token, world, params, detail):
    response = get(client, token, **params)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(detail)


def test_metric_name_is_required(client, token, world):
    response = client.get("/api/analytics/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 400
    assert "metricName" in str(response.json()["detail"])


# Whether the selection holds OTLP points, the transaction's settings, the aggregate.
QUERIES = 3


def test_each_aggregate_is_three_queries_whatever_the_size(
    world, project, django_assert_num_queries
):
    points = analytics.points(RunMetric.objects.filter(project=project), "duration_ms")
    with django_assert_num_queries(QUERIES):
        analytics.aggregate(points, "duration_ms", "p95")
    with django_assert_num_queries(QUERIES):
        analytics.aggregate(points, "duration_ms", "avg", "slug")


def test_grouping_by_slug_looks_up_each_points_run_instead_of_joining_every_run(
    world, project, django_assert_num_queries
):
    # A join let PostgreSQL hash the whole runs table to label a day's points: 4x the
    # time at 30 days of history as at 3 (docs/scaling.md). A lookup by the point's run
    # id costs what the window holds.
    points = analytics.points(RunMetric.objects.filter(project=project), "duration_ms")
    with django_assert_num_queries(QUERIES) as captured:
        analytics.aggregate(points, "duration_ms", "count", "slug")
    sql = captured.captured_queries[-1]["sql"]
    assert "JOIN" not in sql.upper()
    assert 'WHERE U0."id" = ("runs_runmetric"."run_id")' in sql


@pytest.mark.django_db(transaction=True)  # committed as in a request, so SET LOCAL ends
def test_an_aggregate_runs_without_jit_and_with_room_to_sort(world, project, settings):
    # The settings hold for the aggregate's own transaction only.
    settings.ANALYTICS_WORK_MEM_MB = 32
    seen = []

    def spy(execute, sql, params, many, context):
        # Just before each statement: what PostgreSQL would run it with (read through
        # the raw driver cursor, so the spy does not watch itself).
        raw = context["cursor"].cursor
        raw.execute("SELECT current_setting('jit'), current_setting('work_mem')")
        seen.append(raw.fetchone())
        return execute(sql, params, many, context)

    points = analytics.points(RunMetric.objects.filter(project=project), "duration_ms")
    from django.db import connection

    with connection.execute_wrapper(spy):
        analytics.aggregate(points, "duration_ms", "p95")
    assert seen[-1] == ("off", "32MB")
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('work_mem')")
        assert cursor.fetchone()[0] != "32MB"
