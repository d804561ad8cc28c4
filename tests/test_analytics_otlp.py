"""GET /api/analytics/metrics over OTLP points: percentiles from histogram buckets and
cumulative series counted by their newest point. Expected values are worked out by
hand in the comments (Prometheus' histogram_quantile interpolation)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from runs import analytics, insights
from runs.models import Run, RunMetric
from tests.fixtures.otlp.payloads import T0, attrs, metrics_request, to_json

MINUTE = 60 * 10**9
BOUNDS = [10.0, 20.0, 50.0]  # buckets (-,10] (10,20] (20,50] (50,+Inf)


@pytest.fixture
def post_otlp(client, token, django_capture_on_commit_callbacks):
    """POST an OTLP metrics request (protobuf or its JSON twin); the worker stores it."""

    def post(request, *, json: bool = False):
        if json:
            body, content_type = orjson.dumps(to_json(request)), "application/json"
        else:
            body, content_type = request.SerializeToString(), "application/x-protobuf"
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                "/v1/metrics", body, content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {token}"
            )
        assert response.status_code == 200, response.content

    return post


def get(client, token, metric="gastown.bd.duration_ms", **params):
    response = client.get(
        "/api/analytics/metrics",
        {"metricName": metric, **params},
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 200, response.content
    return response.json()


def histogram(
    points: list[tuple[int, list[int], float, float | None, float | None]],
    labels: dict | None = None,
    cumulative: bool = False,
    name: str = "gastown.bd.duration_ms",
) -> Metric:
    """One OTLP histogram: points of (time offset in minutes, counts, sum, min, max)."""
    metric = Metric(name=name, unit="ms")
    metric.histogram.aggregation_temporality = 2 if cumulative else 1
    for minutes, counts, total, low, high in points:
        dp = metric.histogram.data_points.add()
        dp.time_unix_nano = T0 + minutes * MINUTE
        dp.start_time_unix_nano = T0 - MINUTE
        dp.explicit_bounds.extend(BOUNDS)
        dp.bucket_counts.extend(counts)
        dp.count = sum(counts)
        dp.sum = total
        if low is not None:
            dp.min = low
        if high is not None:
            dp.max = high
        dp.attributes.extend(attrs(labels or {"subcommand": "show"}))
    return metric


def counter(points: list[tuple[int, int]], labels: dict, cumulative: bool) -> Metric:
    metric = Metric(name="gastown.bd.calls.total", unit="1")
    metric.sum.aggregation_temporality = 2 if cumulative else 1
    metric.sum.is_monotonic = True
    for minutes, value in points:
        dp = metric.sum.data_points.add()
        dp.as_int = value
        dp.time_unix_nano = T0 + minutes * MINUTE
        dp.start_time_unix_nano = T0 - MINUTE
        dp.attributes.extend(attrs(labels))
    return metric


# --- The interpolation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "low", "high", "expected"),
    [
        # counts [2, 3, 4, 1], total 10.
        # p50: rank 5 reaches the cumulative 5 in (10,20]: 10 + 10 × (5 - 2) / 3.
        (0.5, None, None, 20.0),
        # p10: rank 1 in the first bucket, which starts at 0: 0 + 10 × 1 / 2.
        (0.1, None, None, 5.0),
        # ... or at the minimum when it is known: 4 + 6 × 1 / 2.
        (0.1, 4.0, None, 7.0),
        # p95: rank 9.5 in the +Inf bucket: its lower bound without a maximum...
        (0.95, None, None, 50.0),
        # ... interpolated up to the maximum with one: 50 + 30 × 0.5 / 1.
        (0.95, None, 80.0, 65.0),
        # p99 with a maximum below the bucket's upper edge: 50 + 30 × 0.9.
        (0.99, 4.0, 80.0, 77.0),
        # p60: rank 6 in (20,50], clamped to a maximum of 30: 20 + 10 × 1 / 4.
        (0.6, None, 30.0, 22.5),
    ],
)
def test_it_interpolates_inside_the_bucket_the_rank_falls_in(q, low, high, expected):
    assert analytics.bucket_quantile(q, BOUNDS, [2, 3, 4, 1], low, high) == pytest.approx(expected)


def test_it_answers_nothing_for_empty_or_malformed_buckets():
    assert analytics.bucket_quantile(0.5, BOUNDS, [0, 0, 0, 0]) is None
    assert analytics.bucket_quantile(0.5, BOUNDS, []) is None
    assert analytics.bucket_quantile(0.5, BOUNDS, [1, 2]) is None
    # A first bucket ending at or below 0 answers its bound, as Prometheus does.
    assert analytics.bucket_quantile(0.5, [0.0, 5.0], [4, 1, 0]) == 0.0


# --- Histograms through the receiver -------------------------------------------------


@pytest.mark.parametrize("json", [False, True], ids=["protobuf", "json"])
def test_it_merges_the_buckets_of_delta_histogram_points(client, token, post_otlp, json):
    # Observations 5, 12, 18, 25 then 15, 30, 40, 45, 70, in two exports.
    post_otlp(metrics_request(histogram([(0, [1, 2, 1, 0], 60.0, 5.0, 25.0)])), json=json)
    post_otlp(metrics_request(histogram([(1, [0, 1, 3, 1], 200.0, 15.0, 70.0)])), json=json)
    # Merged: [1, 3, 4, 1], 9 observations, sum 260, min 5, max 70.
    expected = {
        "p50": 20 + 30 * (4.5 - 4) / 4,  # rank 4.5 in (20,50]: 23.75
        "p95": 50 + 20 * (8.55 - 8) / 1,  # rank 8.55 in (50,+Inf), up to the max: 61
        "p99": 50 + 20 * (8.91 - 8) / 1,  # 68.2
        "avg": 260 / 9,
        "sum": 260.0,
        "count": 9,
        "min": 5.0,
        "max": 70.0,
    }
    for aggregation, value in expected.items():
        answer = get(client, token, aggregation=aggregation)
        assert answer["value"] == pytest.approx(value), aggregation
        assert (answer["count"], answer["min"], answer["max"]) == (9, 5.0, 70.0)
        assert answer["histogram"]["points"] == 2
    assert get(client, token, aggregation="p95")["histogram"] == {
        "points": 2,
        "plain_points_ignored": 0,
        "other_bounds_points": 0,
        "bounds": BOUNDS,
    }
    # No sum of squares travels with a histogram: no standard deviation.
    assert get(client, token, aggregation="stddev")["value"] is None


def test_it_counts_only_the_newest_point_of_each_cumulative_histogram_series(
    client, token, post_otlp
):
    # One series exported three times, running totals; its last export holds
    # 5 | 12, 18 | 30, 40, 45 | 60: [1, 2, 3, 1], sum 210.
    show = histogram(
        [
            (0, [1, 0, 0, 0], 5.0, 5.0, 5.0),
            (1, [1, 2, 0, 0], 35.0, 5.0, 18.0),
            (2, [1, 2, 3, 1], 210.0, 5.0, 60.0),
        ],
        cumulative=True,
    )
    post_otlp(metrics_request(show))
    answer = get(client, token, aggregation="p95")
    # Rank 6.65 of 7 in (50,+Inf), up to the max 60: 50 + 10 × 0.65.
    assert answer["value"] == pytest.approx(56.5)
    assert (answer["count"], answer["min"], answer["max"]) == (7, 5.0, 60.0)
    # p50: rank 3.5 in (20,50]: 20 + 30 × 0.5 / 3.
    assert get(client, token, aggregation="p50")["value"] == pytest.approx(25.0)
    assert get(client, token, aggregation="sum")["value"] == 210.0

    # A second series (another label set) adds its own newest point: 15.
    post_otlp(
        metrics_request(
            histogram([(3, [0, 1, 0, 0], 15.0, 15.0, 15.0)], {"subcommand": "list"}, True)
        )
    )
    # Merged [1, 3, 3, 1]: p50 rank 4 ends (10,20]: 10 + 10 × 3 / 3; p95 rank 7.6.
    assert get(client, token, aggregation="p50")["value"] == pytest.approx(20.0)
    assert get(client, token, aggregation="p95")["value"] == pytest.approx(50 + 10 * 0.6)
    assert get(client, token, aggregation="count")["value"] == 8
    assert get(client, token, aggregation="avg")["value"] == pytest.approx(225 / 8)


# --- Cumulative and delta sums ---------------------------------------------------------


def test_it_sums_the_newest_value_of_each_cumulative_counter_series(client, token, post_otlp):
    post_otlp(
        metrics_request(
            counter([(0, 1), (1, 2), (2, 3)], {"status": "ok"}, cumulative=True),
            counter([(0, 1), (2, 1)], {"status": "error"}, cumulative=True),
        )
    )
    metric = "gastown.bd.calls.total"
    assert RunMetric.objects.filter(name=metric).count() == 5  # stored as sent
    answer = get(client, token, metric, aggregation="sum")
    # ok's total is 3, error's 1: two series, not five values adding to 8.
    assert (answer["value"], answer["count"], answer["min"], answer["max"]) == (4.0, 2, 1.0, 3.0)
    assert "histogram" not in answer
    assert get(client, token, metric, aggregation="avg")["value"] == 2.0
    assert get(client, token, metric, aggregation="p50")["value"] == 2.0
    # A window picks the newest point inside it: ok's total at minute 1 was 2.
    until = datetime.fromtimestamp((T0 + MINUTE) / 1e9 + 1, UTC).isoformat()
    assert get(client, token, metric, aggregation="sum", until=until)["value"] == 3.0


def test_a_restarted_process_starts_a_new_series_and_both_totals_count(client, token, post_otlp):
    # Same run, same labels: the process counted to 5, restarted, and counts again from
    # zero. Its start time tells the two lives apart, so the total is 5 + 2.
    first = counter([(0, 3), (1, 5)], {"status": "ok"}, cumulative=True)
    again = counter([(3, 1), (4, 2)], {"status": "ok"}, cumulative=True)
    for dp in again.sum.data_points:
        dp.start_time_unix_nano = T0 + 2 * MINUTE
    post_otlp(metrics_request(first))
    post_otlp(metrics_request(again), json=True)
    starts = set(RunMetric.objects.values_list("labels__otel.start", flat=True))
    assert len(starts) == 2
    answer = get(client, token, "gastown.bd.calls.total", aggregation="sum")
    assert (answer["value"], answer["count"]) == (7.0, 2)


def test_it_adds_every_delta_point(client, token, post_otlp):
    post_otlp(
        metrics_request(
            counter([(0, 1), (1, 2), (2, 3)], {"status": "ok"}, cumulative=False),
            counter([(0, 1), (2, 1)], {"status": "error"}, cumulative=False),
        )
    )
    answer = get(client, token, "gastown.bd.calls.total", aggregation="sum")
    assert (answer["value"], answer["count"]) == (8.0, 5)


# --- Points made with the ORM: runs, groups, mixes ---------------------------------------


def at(minutes: int) -> datetime:
    return datetime(2026, 4, 21, 5, tzinfo=UTC) + timedelta(minutes=minutes)


def point(project, run=None, *, minutes=0, value=0.0, hist=None, labels=None, source="otlp"):
    return RunMetric(
        project=project,
        run=run,
        name="gastown.bd.duration_ms",
        value=hist["sum"] if hist else value,
        unit="ms",
        labels=labels or {},
        recorded_at=at(minutes),
        source=source,
        histogram=hist,
    )


def hist(counts, total, low=None, high=None, bounds=BOUNDS):
    return {
        "bounds": bounds,
        "counts": counts,
        "sum": total,
        "count": sum(counts),
        "min": low,
        "max": high,
    }


CUMULATIVE = {"otel.temporality": "cumulative", "subcommand": "show"}
DELTA = {"otel.temporality": "delta", "subcommand": "show"}


@pytest.fixture
def runs(project):
    return {
        "api-1": Run.objects.create(project=project, run_id="api-1", slug="acme__api"),
        "api-2": Run.objects.create(project=project, run_id="api-2", slug="acme__api"),
        "web-1": Run.objects.create(project=project, run_id="web-1", slug="acme__web"),
    }


def test_cumulative_series_of_different_runs_are_kept_apart(client, token, project, runs):
    RunMetric.objects.bulk_create(
        [
            # The same labels on two runs: two series, each counted by its newest point.
            point(project, runs["api-1"], minutes=0, hist=hist([1, 0, 0, 0], 5), labels=CUMULATIVE),
            point(
                project, runs["api-1"], minutes=1, hist=hist([2, 1, 0, 0], 25), labels=CUMULATIVE
            ),
            point(
                project, runs["api-2"], minutes=0, hist=hist([0, 0, 2, 0], 60), labels=CUMULATIVE
            ),
        ]
    )
    answer = get(client, token, aggregation="count")
    assert (answer["value"], answer["histogram"]["points"]) == (5, 2)
    assert get(client, token, aggregation="sum")["value"] == 85.0


def test_it_answers_each_group_from_its_own_points(client, token, project, runs):
    RunMetric.objects.bulk_create(
        [
            # acme__api: histograms, delta (both count) and cumulative (the newest counts).
            point(project, runs["api-1"], minutes=0, hist=hist([2, 0, 0, 0], 10), labels=DELTA),
            point(project, runs["api-1"], minutes=1, hist=hist([0, 2, 0, 0], 30), labels=DELTA),
            point(
                project, runs["api-2"], minutes=0, hist=hist([0, 0, 9, 0], 99), labels=CUMULATIVE
            ),
            point(project, runs["api-2"], minutes=5, hist=hist([0, 0, 0, 4], 0), labels=CUMULATIVE),
            # acme__web: plain points, today's percentile_cont.
            point(project, runs["web-1"], value=100.0, source="api"),
            point(project, runs["web-1"], value=300.0, source="api"),
        ]
    )
    api, web = get(client, token, aggregation="p50", groupBy="slug")
    # acme__api merges [2, 2, 0, 0] + [0, 0, 0, 4] = [2, 2, 0, 4]: rank 4 ends (10,20].
    assert (api["group"], api["value"], api["count"]) == ("acme__api", 20.0, 8)
    assert api["histogram"]["points"] == 3
    assert (web["group"], web["value"], web["count"], web["max"]) == ("acme__web", 200.0, 2, 300)
    assert "histogram" not in web
    # By day: every point is on one day, the same merge.
    (today,) = get(client, token, aggregation="count", groupBy="day")
    assert (today["group"], today["value"]) == ("2026-04-21", 8)


def test_a_mix_of_histogram_and_plain_points_is_answered_from_the_histograms(
    client, token, project
):
    RunMetric.objects.bulk_create(
        [
            point(project, hist=hist([1, 1, 0, 0], 20, 5.0, 15.0), labels=DELTA),
            point(project, value=1000.0, source="api"),
            point(project, value=2000.0, source="api"),
        ]
    )
    answer = get(client, token, aggregation="max")
    # The plain points are left out, and said so: they are no observations of the buckets.
    assert (answer["value"], answer["count"], answer["min"]) == (15.0, 2, 5.0)
    assert answer["histogram"]["plain_points_ignored"] == 2
    assert get(client, token, aggregation="sum")["value"] == 20.0


def test_percentiles_use_the_bounds_holding_the_most_observations(client, token, project):
    RunMetric.objects.bulk_create(
        [
            point(project, minutes=0, hist=hist([1, 1, 0, 0], 25), labels=DELTA),
            point(project, minutes=1, hist=hist([0, 1, 1, 0], 45), labels=DELTA),
            point(project, minutes=2, hist=hist([1, 0], 1, bounds=[5.0]), labels=DELTA),
        ]
    )
    answer = get(client, token, aggregation="p50")
    # [1, 2, 1, 0] from the two points with BOUNDS; rank 2 in (10,20]: 10 + 10 × 1 / 2.
    assert answer["value"] == pytest.approx(15.0)
    assert answer["count"] == 5  # every histogram point counts for count, sum and avg
    assert (answer["min"], answer["max"]) == (None, None)  # no point carried them
    assert answer["histogram"]["other_bounds_points"] == 1
    assert answer["histogram"]["bounds"] == BOUNDS


def test_a_min_or_max_is_known_only_when_every_point_carries_one(client, token, project):
    RunMetric.objects.bulk_create(
        [
            point(project, minutes=0, hist=hist([1, 0, 0, 0], 2, 2.0, 2.0), labels=DELTA),
            point(project, minutes=1, hist=hist([0, 0, 0, 1], 90, 90.0), labels=DELTA),
        ]
    )
    answer = get(client, token, aggregation="p99")
    assert (answer["min"], answer["max"]) == (2.0, None)
    # Rank 1.98 in the +Inf bucket, max unknown: its lower bound.
    assert answer["value"] == 50.0


def test_points_sent_to_the_api_keep_todays_rules_whatever_their_labels(client, token, project):
    RunMetric.objects.bulk_create(
        [
            point(project, minutes=0, value=1.0, labels=CUMULATIVE, source="api"),
            point(project, minutes=1, value=2.0, labels=CUMULATIVE, source="api"),
        ]
    )
    assert get(client, token, aggregation="sum")["value"] == 3.0


# Whether the selection holds OTLP points, the transaction's settings, the aggregate.
QUERIES = 3


def test_a_histogram_percentile_per_group_is_three_queries(
    project, runs, django_assert_num_queries
):
    RunMetric.objects.bulk_create(
        [
            point(project, runs["api-1"], hist=hist([1, 1, 0, 0], 25), labels=CUMULATIVE),
            point(project, runs["web-1"], hist=hist([0, 1, 1, 0], 45), labels=DELTA),
        ]
    )
    points = analytics.points(RunMetric.objects.filter(project=project), "gastown.bd.duration_ms")
    with django_assert_num_queries(QUERIES):
        rows = analytics.aggregate(points, "gastown.bd.duration_ms", "p95", "slug")
    assert [row["group"] for row in rows] == ["acme__api", "acme__web"]
    with django_assert_num_queries(QUERIES):
        analytics.aggregate(points, "gastown.bd.duration_ms", "p95")


# --- The OpenTelemetry SDK ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_answers_a_p95_of_an_sdk_histogram_from_its_newest_export(live_server, token):
    exporter = OTLPMetricExporter(
        endpoint=f"{live_server.url}/v1/metrics",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        resource=Resource.create({"service.name": "gastown"}), metric_readers=[reader]
    )
    duration = provider.get_meter("gastown").create_histogram("gastown.bd.duration_ms", unit="ms")
    for ms in (2, 4, 6, 8, 12):
        duration.record(ms, {"subcommand": "show"})
    provider.force_flush()  # a first cumulative export: 5 observations
    for ms in (14, 16, 18, 20, 30):
        duration.record(ms, {"subcommand": "show"})
    provider.shutdown()  # the second repeats them and adds 5 more

    stored = RunMetric.objects.filter(name="gastown.bd.duration_ms").order_by("recorded_at")
    assert [p.histogram["count"] for p in stored] == [5, 10]
    assert stored[0].labels["otel.temporality"] == "cumulative"
    # The SDK's default bounds 0, 5, 10, 25, 50, …: the newest export holds (0,5] 2,
    # (5,10] 2, (10,25] 5, (25,50] 1. Rank 0.95 × 10 = 9.5 falls in (25,50] after 9,
    # whose upper edge is the max, 30: 25 + (30 - 25) × 0.5 / 1 = 27.5.
    response = analytics.aggregate(
        analytics.points(RunMetric.objects.all(), "gastown.bd.duration_ms"),
        "gastown.bd.duration_ms",
        "p95",
    )
    assert response["value"] == pytest.approx(27.5)
    assert (response["count"], response["min"], response["max"]) == (10, 2, 30)
    # p50: rank 5 in (10,25] after 4: 10 + 15 × 1 / 5.
    p50 = analytics.aggregate(
        analytics.points(RunMetric.objects.all(), "gastown.bd.duration_ms"),
        "gastown.bd.duration_ms",
        "p50",
    )
    assert p50["value"] == pytest.approx(13.0)


# --- The metrics dashboard's chart --------------------------------------------------------


def test_the_chart_plots_a_cumulative_series_by_its_newest_point_per_step(project, runs):
    counter = {"otel.temporality": "cumulative", "status": "ok"}
    RunMetric.objects.bulk_create(
        [
            # Running totals 1, 2, 3 in the first hour, 10 in the second.
            point(project, runs["api-1"], minutes=5, value=1.0, labels=counter),
            point(project, runs["api-1"], minutes=15, value=2.0, labels=counter),
            point(project, runs["api-1"], minutes=25, value=3.0, labels=counter),
            point(project, runs["api-1"], minutes=65, value=10.0, labels=counter),
            # Another run's series in the first hour: its total 5.
            point(project, runs["api-2"], minutes=30, value=5.0, labels=counter),
        ]
    )
    series, _, _ = insights.metric_series(
        "gastown.bd.duration_ms", at(0), at(120), timedelta(hours=1)
    )
    # Per hour, the average of each series' running total then: (3 + 5) / 2, then 10.
    assert [(t, v, n) for t, v, n in series["acme__api"]] == [(at(0), 4.0, 2), (at(60), 10.0, 1)]


def test_the_chart_plots_the_mean_observation_of_histogram_points(project, runs):
    RunMetric.objects.bulk_create(
        [
            point(project, runs["web-1"], minutes=1, hist=hist([1, 1, 0, 0], 30), labels=DELTA),
            point(project, runs["web-1"], minutes=2, hist=hist([0, 0, 2, 0], 90), labels=DELTA),
        ]
    )
    series, unit, _ = insights.metric_series(
        "gastown.bd.duration_ms", at(0), at(60), timedelta(hours=1)
    )
    # 120 ms over 4 observations, not the average of the per-point sums (60).
    assert series["acme__web"] == [(at(0), 30.0, 2)] and unit == "ms"
