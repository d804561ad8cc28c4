"""The metrics dashboard (/insights), the run page's metrics panel, and the tool and
provider statistics behind them, checked against values computed by hand."""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from runs import charts, insights
from runs.models import Run, RunMetric
from tests.conftest import ndjson, record

XSS = "<script>alert(1)</script>"


def now_ts(seconds_ago: float = 0) -> str:
    return (timezone.now() - timedelta(seconds=seconds_ago)).isoformat()


@pytest.fixture
def agent_run(post_events) -> Run:
    """A run whose tools and LLM calls follow the agents of the seeds (Gitoma, Code Buddy)."""
    tool = [
        record("tool.call", now_ts(60), data={"tool": "bash"}),  # start marker: not counted
        record(
            "tool.result", now_ts(59), data={"tool": "bash", "success": True, "duration_ms": 100}
        ),
        record("tool.result", now_ts(58), data={"tool": "bash", "ok": True, "duration_ms": 200}),
        record("tool.result", now_ts(57), data={"tool": "bash", "duration_ms": 300}),
        record("tool.error", now_ts(56), level="error", data={"tool": "bash", "duration_ms": 400}),
        # Code Buddy: one event per execution, `toolName`, `duration` in ms.
        record(
            "tool_call",
            now_ts(55),
            data={"toolName": "web_fetch", "success": False, "duration": 10_000},
        ),
        record(
            "tool_call",
            now_ts(54),
            data={"toolName": "web_fetch", "success": True, "latency_ms": 30_000},
        ),
        record("tool.result", now_ts(53), data={"tool": "noop", "status": "ok"}),
        record("tool.result", now_ts(52), data={"tool": XSS, "success": True}),
    ]
    llm = [
        record(
            "llm.call",
            now_ts(50),
            data={
                "model": "gpt-4o",
                "provider": "openai",
                "tokens_in": 100,
                "tokens_out": 50,
                "cost_usd": 0.01,
                "latency_ms": 500,
            },
        ),
        record(
            "llm.call",
            now_ts(49),
            data={
                "model": "gpt-4o",
                "provider": "openai",
                "usage": {"prompt_tokens": 200, "completion_tokens": 20},
                "cost_usd": 0.02,
                "latency_ms": 1500,
            },
        ),
        record(
            "llm.call",
            now_ts(48),
            data={
                "model": "<img src=x onerror=alert(1)>",
                "provider": "anthropic",
                "tokens_in": 10,
                "tokens_out": 5,
                "latency_ms": 800,
                "success": False,
            },
        ),
    ]
    post_events(ndjson(record("run.begin", now_ts(61)), *tool, *llm), run_id="agent-1")
    run = Run.objects.get(run_id="agent-1")
    for value, labels in ((50, {"tool": "grep", "success": "false"}), (70, {"tool": "grep"})):
        RunMetric.objects.create(
            project=run.project, run=run, name="tool_duration_ms", value=value, labels=labels
        )
    return run


def window():
    _, since, until = insights.window("1h")
    return since, until


def test_tool_statistics_match_hand_computed_values(agent_run):
    tools = {t.tool: t for t in insights.tool_stats(*window())}
    bash = tools["bash"]
    assert (bash.calls, bash.successes, bash.errors) == (4, 3, 1)
    assert bash.success_rate == 0.75
    # percentile_cont over 100, 200, 300, 400: linear between the closest ranks.
    assert (bash.p50_ms, bash.p95_ms, bash.p99_ms) == pytest.approx((250, 385, 397))
    assert bash.speed_score == 1.0
    assert bash.reliability == pytest.approx(0.8 * 0.75 + 0.2 * 1.0)

    fetch = tools["web_fetch"]
    assert (fetch.calls, fetch.errors) == (2, 1)
    assert fetch.p50_ms == pytest.approx(20_000)
    speed = 1 - math.log(20) / math.log(60)
    assert fetch.speed_score == pytest.approx(speed)
    assert fetch.reliability == pytest.approx(0.8 * 0.5 + 0.2 * speed)

    grep = tools["grep"]  # from RunMetric rows
    assert (grep.calls, grep.errors, grep.p50_ms) == (2, 1, pytest.approx(60))
    noop = tools["noop"]  # no duration: the success rate alone
    assert (noop.calls, noop.speed_score, noop.reliability) == (1, None, 1.0)
    # Most failures first.
    assert [t.tool for t in insights.tool_stats(*window())][:3] == ["bash", "grep", "web_fetch"]


def test_speed_score_falls_with_the_log_of_the_median():
    assert insights.speed_score(None) is None
    assert insights.speed_score(300) == 1.0 and insights.speed_score(1000) == 1.0
    assert insights.speed_score(60_000) == 0.0 and insights.speed_score(600_000) == 0.0
    assert insights.speed_score(math.sqrt(60) * 1000) == pytest.approx(0.5)


def test_provider_statistics_match_hand_computed_values(agent_run):
    rows = {(p.provider, p.model): p for p in insights.provider_stats(*window())}
    gpt = rows[("openai", "gpt-4o")]
    assert (gpt.requests, gpt.errors, gpt.tokens_in, gpt.tokens_out) == (2, 0, 300, 70)
    assert gpt.cost_usd == pytest.approx(0.03)
    assert (gpt.p50_ms, gpt.p95_ms, gpt.p99_ms) == pytest.approx((1000, 1450, 1490))
    other = rows[("anthropic", "<img src=x onerror=alert(1)>")]
    assert (other.requests, other.errors, other.tokens) == (1, 1, 15)


def test_statistics_keep_to_their_window(agent_run):
    later = timezone.now() + timedelta(hours=2)
    assert insights.tool_stats(later - timedelta(hours=1), later) == []
    assert insights.provider_stats(later - timedelta(hours=1), later) == []


def test_cost_per_slug_and_day_comes_from_the_runs(project):
    today = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    for i, (slug, days_ago, cost) in enumerate(
        [("a", 0, "1.50"), ("a", 1, "0.50"), ("b", 0, "0.25"), ("a", 0, "0.10")]
    ):
        Run.objects.create(
            project=project,
            run_id=f"c{i}",
            slug=slug,
            started_at=today - timedelta(days=days_ago),
            cost_usd=Decimal(cost),
        )
    days, series = insights.cost_per_slug_day(today - timedelta(days=6), today)
    assert len(days) == 7 and days[-1].date() == today.date()
    assert series["a"][-1] == pytest.approx(1.6) and series["a"][-2] == pytest.approx(0.5)
    assert series["b"][-1] == pytest.approx(0.25) and sum(series["b"]) == pytest.approx(0.25)
    assert list(series) == ["a", "b"]  # costliest first


def test_anonymous_visitors_are_sent_to_log_in(client, agent_run):
    for url in ("/insights", f"/run-metrics/{agent_run.pk}"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")


def test_the_dashboard_shows_charts_and_tables_with_agent_text_escaped(
    operator_client, agent_run, django_assert_max_num_queries
):
    hostile = Run.objects.create(
        project=agent_run.project,
        run_id="x",
        slug=XSS,
        cost_usd=Decimal("2.5"),
        started_at=timezone.now(),
    )
    for i, run in enumerate([agent_run, hostile, agent_run]):
        RunMetric.objects.create(
            project=run.project,
            run=run,
            name="duration_ms",
            value=1000 * (i + 1),
            unit="ms",
            recorded_at=timezone.now() - timedelta(minutes=10 * i),
        )
    with django_assert_max_num_queries(12):
        response = operator_client.get("/insights?window=1h&metric=duration_ms")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'style="' not in html  # the CSP forbids inline styles
    # One series per slug: a line through agent-1's two points, a lone dot for the other.
    assert html.count("<polyline") == 1 and html.count("<circle") == 3
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt; · " in html  # point tooltips
    assert "ms</text>" in html  # the unit on the value axis
    assert "Cost per slug and day" in html and "$2.5" in html
    assert "<code>bash</code>" in html and "0.80" in html  # the reliability column
    assert "gpt-4o" in html and "1.45 s" in html  # p95 latency of the provider table


def test_a_bad_window_or_metric_falls_back_rather_than_failing(operator_client, agent_run):
    response = operator_client.get("/insights?window=forever&metric=nope&by=<x>")
    assert response.status_code == 200
    assert "last 24h" in response.content.decode()


def test_the_run_page_shows_its_metrics_with_a_sparkline_for_repeats(operator_client, agent_run):
    for i, value in enumerate([3, 5, 4]):
        RunMetric.objects.create(
            project=agent_run.project,
            run=agent_run,
            name="files_changed",
            value=value,
            unit="files",
            recorded_at=timezone.now() - timedelta(minutes=3 - i),
        )
    RunMetric.objects.create(
        project=agent_run.project, run=agent_run, name=XSS, value=1, unit="<b>u</b>"
    )
    html = operator_client.get(agent_run.get_absolute_url()).content.decode()
    assert 'id="run-metrics"' in html
    panel = html[
        html.index('id="run-metrics"') : html.index("</section>", html.index('id="run-metrics"'))
    ]
    assert "<code>files_changed</code>" in panel and ">4<" in panel  # the latest value
    assert panel.count("<polyline") == 2  # files_changed and tool_duration_ms repeat
    assert "&lt;script&gt;" in panel and "&lt;b&gt;u&lt;/b&gt;" in panel
    assert "<script>alert" not in panel


def test_the_metrics_panel_polls_while_live_and_stops_when_the_run_ends(operator_client, agent_run):
    url = f"/run-metrics/{agent_run.pk}"
    poll = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TRIGGER": "run-metrics"}
    live = operator_client.get(url, **poll)
    assert live.status_code == 200 and 'hx-trigger="every 10s"' in live.content.decode()
    assert "<html" not in live.content.decode()
    Run.objects.filter(pk=agent_run.pk).update(status="succeeded")
    ended = operator_client.get(url, **poll)
    assert ended.status_code == 286 and "hx-trigger" not in ended.content.decode()
    assert operator_client.get("/run-metrics/999999").status_code == 404


def test_charts_scale_to_nice_axes():
    assert charts.nice_ceiling(7) == 10 and charts.nice_ceiling(0.3) == 0.5
    assert charts.nice_ceiling(2400) == 2500
    assert charts.compact(1500, "ms") == "1,500 ms" and charts.compact(25_000) == "25k"
    assert charts.compact(0.25, "USD") == "$0.25"
    spark = charts.sparkline([1, 3, 2])
    assert spark is not None and len(spark.points.split()) == 3
    assert charts.sparkline([5]) is None
