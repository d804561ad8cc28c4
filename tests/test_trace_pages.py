"""Traces: the tree rebuilt from stored spans, the waterfall layout, and the pages.

Spans are made with the ORM, as the OTLP receiver would store them (any order,
parents possibly missing); the tree and layout tests need no database at all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runs.models import Event, Run
from telemetry import traces
from telemetry.models import Span
from telemetry.traces import build_tree, layout, ticks

T0 = datetime(2026, 4, 21, 5, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="alert(1)">'


def sid(n: int) -> str:
    return f"{n:016x}"


def span(n: int, parent: int | None, start: float, duration: float, **fields) -> Span:
    """Span number n (id sid(n)), `start` ms after T0, child of span `parent`."""
    begin = T0 + timedelta(milliseconds=start)
    return Span(
        trace_id=fields.pop("trace_id", TRACE),
        span_id=sid(n),
        parent_span_id=sid(parent) if parent is not None else "",
        name=fields.pop("name", f"op-{n}"),
        start_time=begin,
        end_time=begin + timedelta(milliseconds=duration),
        duration_ms=duration,
        **fields,
    )


def shape(rows) -> list[tuple[str, int]]:
    return [(node.span.name, node.depth) for node in rows]


# --- The tree -------------------------------------------------------------------


def test_it_nests_children_under_parents_that_arrived_after_them():
    spans = [
        span(3, 2, 20, 5),  # grandchild first, as exporters send finished spans
        span(2, 1, 10, 30),
        span(4, 1, 5, 2),
        span(1, None, 0, 100),
    ]
    assert shape(build_tree(spans)) == [("op-1", 0), ("op-4", 1), ("op-2", 1), ("op-3", 2)]


def test_it_shows_a_span_with_a_missing_parent_at_root_level_marked():
    spans = [span(1, None, 0, 50), span(2, 1, 5, 10), span(7, 99, 3, 4), span(8, 7, 3.5, 1)]
    rows = build_tree(spans)
    assert shape(rows) == [("op-1", 0), ("op-2", 1), ("op-7", 0), ("op-8", 1)]
    assert [node.orphan for node in rows] == [False, False, True, False]


def test_it_orders_siblings_with_equal_starts_by_span_id_whatever_the_arrival_order():
    spans = [span(1, None, 0, 10), span(5, 1, 0, 3), span(3, 1, 0, 9), span(4, 1, 0, 1)]
    expected = [("op-1", 0), ("op-3", 1), ("op-4", 1), ("op-5", 1)]
    assert shape(build_tree(spans)) == expected
    assert shape(build_tree(reversed(spans))) == expected


def test_a_child_starting_with_its_parent_stays_below_it():
    spans = [span(2, 1, 0, 10), span(1, None, 0, 10), span(3, 2, 0, 10)]
    assert shape(build_tree(spans)) == [("op-1", 0), ("op-2", 1), ("op-3", 2)]


def test_it_handles_deep_nesting_without_recursion():
    depth = 5000
    spans = [span(n + 1, n if n else None, n, depth - n) for n in range(depth)]
    rows = build_tree(reversed(spans))
    assert [node.depth for node in rows] == list(range(depth))
    assert rows[-1].indent == 24  # drawn at the deepest indentation, the depth shown as text


def test_parent_loops_are_shown_once_and_never_walked_forever():
    spans = [
        span(1, None, 0, 10),
        span(2, 3, 1, 1),  # 2 → 3 → 2: a loop with no root
        span(3, 2, 2, 1),
        span(4, 3, 3, 1),  # hangs off the loop
        span(5, 5, 4, 1),  # its own parent
    ]
    rows = build_tree(spans)
    assert shape(rows) == [("op-1", 0), ("op-5", 0), ("op-2", 0), ("op-3", 1), ("op-4", 2)]
    assert [node.looped for node in rows] == [False, True, True, False, False]


def test_several_roots_are_ordered_by_start():
    spans = [span(2, None, 30, 5), span(1, None, 10, 5), span(3, 1, 12, 1)]
    assert shape(build_tree(spans)) == [("op-1", 0), ("op-3", 1), ("op-2", 0)]


# --- Layout -------------------------------------------------------------------


def test_bars_are_percentages_of_the_trace_duration():
    rows = build_tree([span(1, None, 0, 200), span(2, 1, 50, 100), span(3, 1, 150, 60)])
    start, total = layout(rows)
    assert (start, total) == (T0, 210)  # first start to last end
    assert [(n.offset, n.width) for n in rows] == [
        (0, 95.238),  # 200 / 210
        (23.81, 47.619),  # 50 / 210, 100 / 210
        (71.429, 28.571),
    ]
    assert (rows[1].x, rows[1].w) == ("23.810%", "47.619%")


def test_instant_spans_get_a_visible_sliver_inside_the_axis():
    rows = build_tree([span(1, None, 0, 100), span(2, 1, 100, 0)])
    layout(rows)
    assert (rows[1].offset, rows[1].width) == (99.8, 0.2)
    single = build_tree([span(1, None, 0, 0)])
    assert layout(single) == (T0, 0)
    assert (single[0].offset, single[0].width) == (0, 0.2)


def test_ticks_fall_on_round_steps_with_units():
    assert [(t.offset, t.label) for t in ticks(1000)] == [
        (0, "0"),
        (20, "200 ms"),
        (40, "400 ms"),
        (60, "600 ms"),
        (80, "800 ms"),
        (100, "1 s"),
    ]
    assert [t.label for t in ticks(12_500)] == ["0", "5 s", "10 s"]
    assert [t.label for t in ticks(3.2)][:3] == ["0", "1 ms", "2 ms"]
    assert [t.label for t in ticks(300_000)][1] == "1 min"
    assert ticks(0)[0].label == "0"
    assert ticks(1000)[-1].anchor == "end" and ticks(1000)[0].anchor == "start"


# --- Pages --------------------------------------------------------------------


@pytest.fixture
def stored(project) -> list[Span]:
    """A small agent trace: a session, two tool calls, an LLM call that failed."""
    run = Run.objects.create(project=project, run_id="run-7", slug="octocat__hello")
    spans = [
        span(1, None, 0, 1200, name="gt.session", service="gastown"),
        span(2, 1, 100, 300, name="bd.call", service="bd"),
        span(3, 1, 450, 600, name="llm.call", service="gastown", status_code=2),
        span(4, 3, 500, 100, name="http.request", service="gastown"),
    ]
    spans[2].status_message = "rate limited " + HOSTILE
    spans[2].attributes = {
        "gen_ai.request.model": "claude",
        "evil": HOSTILE,
        "link": "javascript:alert(document.cookie)",
        "nested": {"x": [1, 2, "<b>"]},
    }
    spans[2].resource = {"service.name": "gastown", "host.name": "<i>box</i>"}
    spans[2].events = [
        {"name": "retry", "time": "2026-04-21T05:00:00.475+00:00", "attributes": {"n": 1}},
        {"name": HOSTILE, "time": 1776747600500000000, "attributes": {"why": HOSTILE}},
    ]
    for s in spans:
        s.project, s.run = project, run
    return Span.objects.bulk_create(spans)


def url(trace_id: str = TRACE) -> str:
    return f"/traces/{trace_id}"


def test_the_pages_need_a_login(client, stored):
    for address in (url(), f"{url()}/spans/{sid(3)}", "/spans"):
        response = client.get(address)
        assert response.status_code == 302, address
        assert response["Location"].startswith("/login/?next="), address


def test_it_draws_the_waterfall_with_depth_status_service_and_an_axis(operator_client, stored):
    response = operator_client.get(url())
    html = response.content.decode()
    assert response.status_code == 200
    assert '<h1 id="trace-title">gt.session</h1>' in html
    assert html.index("gt.session") < html.index("bd.call") < html.index("http.request")
    assert 'class="wf-name d-2"' in html  # http.request under llm.call under the session
    assert '<rect x="37.500%" y="4" width="50.000%"' in html  # llm.call: 450/1200, 600/1200
    assert 'class="bar-error"' in html and html.count('class="bar-ok"') == 3
    assert '<span class="service">bd</span>' in html
    assert "1.20 s" in html and "300 ms" in html
    assert ">500 ms</text>" in html and ">1 s</text>" in html  # the shared time axis
    assert "style=" not in html  # the CSP forbids inline styles; bars are SVG attributes
    assert f'hx-get="/traces/{TRACE}/spans/{sid(3)}?project=acme"' in html
    assert "run-7" in html  # the run the spans belong to


def test_a_span_shows_its_attributes_resource_and_events_escaped(operator_client, stored):
    hx = {"HTTP_HX_REQUEST": "true"}
    response = operator_client.get(f"{url()}/spans/{sid(3)}", **hx)
    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html  # the fragment only
    assert "gen_ai.request.model" in html and "claude" in html
    assert "host.name" in html and "&lt;i&gt;box&lt;/i&gt;" in html
    assert "retry" in html and "+25.0 ms" in html  # the event's time from the span's start
    assert "+50.0 ms" in html  # epoch nanoseconds, as OTLP sends them
    assert "rate limited &lt;script&gt;" in html
    # Hostile values are text: no tag, no handler, no link.
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    assert "javascript:alert(document.cookie)" in html
    assert 'href="javascript' not in html


def test_without_javascript_a_span_link_opens_the_waterfall_with_that_row_open(
    operator_client, stored
):
    html = operator_client.get(url()).content.decode()
    assert f'href="/traces/{TRACE}/spans/{sid(2)}?project=acme#s-2"' in html
    page = operator_client.get(f"{url()}/spans/{sid(2)}").content.decode()
    assert '<details id="s-2" class="span-row" open>' in page
    assert "Waterfall" in page and "— (root)" not in page


def test_the_trace_page_never_renders_hostile_names_as_markup(operator_client, project):
    span(1, None, 0, 5, name=HOSTILE, service=HOSTILE, project=project).save()
    html = operator_client.get(url()).content.decode()
    assert "<script>window" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html


def test_unknown_or_malformed_traces_and_spans_are_404_pages(operator_client, stored):
    for address in (
        url("0" * 31 + "1"),
        url("not-a-trace"),
        url("0" * 32),
        f"{url()}/spans/{sid(99)}",
        f"{url()}/spans/<script>",
    ):
        response = operator_client.get(address)
        assert response.status_code == 404, address
        assert b"<script>" not in response.content


def test_a_uuid_or_upper_case_trace_id_finds_the_trace(operator_client, stored):
    uuid = f"{TRACE[:8]}-{TRACE[8:12]}-{TRACE[12:16]}-{TRACE[16:20]}-{TRACE[20:]}".upper()
    assert operator_client.get(url(uuid)).status_code == 200


def test_a_missing_parent_is_said_on_the_page(operator_client, project):
    Span.objects.bulk_create([span(5, 4, 0, 10, project=project)])
    html = operator_client.get(url()).content.decode()
    assert "parent not received" in html
    assert "(root span not received)" in html
    assert "1 span names a parent that was not received" in html


def test_the_waterfall_fetches_its_rows_in_one_query(
    operator_client, project, django_assert_num_queries
):
    run = Run.objects.create(project=project, run_id="big", slug="s")
    Span.objects.bulk_create(
        [span(n, None if n == 1 else 1, n, 5, project=project, run=run) for n in range(1, 301)]
    )
    # session, user, the spans (with their project and the trace's total), the run
    with django_assert_num_queries(4):
        response = operator_client.get(url())
    assert response.status_code == 200
    assert response.content.decode().count('class="span-row') == 300


def test_a_large_trace_is_capped_and_says_so(operator_client, project, monkeypatch):
    monkeypatch.setattr(traces, "MAX_SPANS", 50)
    Span.objects.bulk_create(
        [span(n, None if n == 1 else 1, n, 5, project=project) for n in range(1, 121)]
    )
    html = operator_client.get(url()).content.decode()
    assert html.count('class="span-row') == 50
    assert "This trace has 120 spans: the waterfall shows the first 50 by start time." in html
    # A span past the cap, opened by its link, is shown above the waterfall.
    beyond = operator_client.get(f"{url()}/spans/{sid(100)}").content.decode()
    assert '<section class="card span-detail" aria-label="Span details">' in beyond
    assert "<code>0000000000000064</code>" in beyond


def test_operators_see_every_project_and_namesake_traces_are_linked(
    operator_client, project, stranger
):
    other, _ = stranger
    Span.objects.bulk_create(
        [
            span(1, None, 0, 5, project=project, name="ours"),
            span(1, None, 100, 5, project=other, name="theirs"),
        ]
    )
    html = operator_client.get(url()).content.decode()
    assert "ours" in html and "theirs" not in html
    assert f'href="/traces/{TRACE}?project=stranger"' in html
    theirs = operator_client.get(url(), {"project": "stranger"}).content.decode()
    assert "theirs" in theirs and "<dd>Stranger</dd>" in theirs


# --- The run page and event links ---------------------------------------------


def test_the_run_page_lists_the_runs_traces(operator_client, stored, project):
    run = Run.objects.get(run_id="run-7")
    second = "a" * 32
    Span.objects.bulk_create(
        [
            span(10, None, 5000, 40, trace_id=second, name="later.root", project=project, run=run),
            span(11, 10, 5010, 10, trace_id=second, project=project, run=run, status_code=2),
            span(12, None, 0, 40, trace_id="b" * 32, name="other.run", project=project),
        ]
    )
    html = operator_client.get("/runs/run-7").content.decode()
    section = html[html.index('id="spans-title"') :]
    assert f'href="/traces/{TRACE}?project=acme"' in section
    assert f'href="/traces/{second}?project=acme"' in section
    assert "other.run" not in section
    assert section.index("gt.session") < section.index("later.root")
    rows, more = traces.run_traces(run)
    assert [(r["root"], r["spans"], r["errors"], r["duration"]) for r in rows] == [
        ("gt.session", 4, 1, "1.20 s"),
        ("later.root", 2, 1, "40.0 ms"),
    ]
    assert more is False


def test_event_rows_carrying_a_trace_id_link_to_the_trace(operator_client, project):
    run = Run.objects.create(project=project, run_id="linked", slug="s")
    common = {"run": run, "ts": T0, "event": "tool.call"}
    Event.objects.bulk_create(
        [
            Event(seq=1, trace_id=TRACE, span_id=sid(1), **common),
            Event(seq=2, trace_id="javascript:alert(1)", **common),
            Event(seq=3, **common),
        ]
    )
    html = operator_client.get("/runs/linked").content.decode()
    assert html.count('class="trace-link"') == 1
    assert f'<a class="trace-link" href="/traces/{TRACE}?project=acme">' in html
    assert 'href="javascript' not in html


def test_the_runs_traces_take_two_queries_however_many_there_are(
    project, django_assert_num_queries
):
    run = Run.objects.create(project=project, run_id="many", slug="s")
    spans = []
    for t in range(60):  # 60 traces of 3 spans: a root and two children
        trace_id = f"{t + 1:032x}"
        spans += [
            span(1, None, t * 10, 9, trace_id=trace_id, name=f"root-{t}"),
            span(2, 1, t * 10 + 1, 2, trace_id=trace_id),
            span(3, 1, t * 10 + 3, 2, trace_id=trace_id),
        ]
    for s in spans:
        s.project, s.run = project, run
    Span.objects.bulk_create(spans)
    with django_assert_num_queries(2):  # the GROUP BY, then the roots' names
        rows, more = traces.run_traces(run)
    assert len(rows) == 50 and more is True
    assert [r["root"] for r in rows[:2]] == ["root-0", "root-1"]
    assert {r["spans"] for r in rows} == {3}


def test_the_nav_marks_spans_on_trace_pages(operator_client, stored):
    html = operator_client.get(url()).content.decode()
    assert 'aria-current="page">Spans</a>' in html
    assert 'aria-current="page">Errors</a>' not in html


def test_a_trace_exported_by_the_opentelemetry_sdk_shows_as_its_waterfall(
    operator_client, client, token, django_capture_on_commit_callbacks
):
    """The real SDK and encoder, the real receiver (eager worker), then the page."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    exporter = InMemorySpanExporter()
    resource = Resource.create({"service.name": "gastown", "run.id": "sdk-run"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("runlens-tests")
    with tracer.start_as_current_span("gt.session") as root:
        with tracer.start_as_current_span("bd.call"):
            pass
        with tracer.start_as_current_span("llm.call") as call:
            call.set_attribute("evil", HOSTILE)
            call.add_event("retry", {"attempt": 2})
            call.set_status(Status(StatusCode.ERROR, "rate limited"))
    trace_id = f"{root.get_span_context().trace_id:032x}"
    body = encode_spans(exporter.get_finished_spans()).SerializeToString()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/v1/traces",
            body,
            content_type="application/x-protobuf",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
    assert response.status_code == 200

    html = operator_client.get(url(trace_id)).content.decode()
    names = [n for n in ("gt.session", "bd.call", "llm.call") if f">{n}</span>" in html]
    assert names == ["gt.session", "bd.call", "llm.call"]
    assert html.index(">bd.call<") < html.index(">llm.call<")
    assert html.count('class="wf-name d-1"') == 2 and 'class="bar-error"' in html
    call_id = f"{call.get_span_context().span_id:016x}"
    detail = operator_client.get(f"{url(trace_id)}/spans/{call_id}", HTTP_HX_REQUEST="true")
    text = detail.content.decode()
    assert "retry" in text and "attempt" in text and "rate limited" in text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text and "<script>" not in text
    run_page = operator_client.get("/runs/sdk-run").content.decode()
    assert f'href="/traces/{trace_id}?project=acme"' in run_page
