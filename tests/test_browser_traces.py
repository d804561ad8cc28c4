"""The trace waterfall in a real browser (Debian's Chromium through Playwright).

Spans are stored with the ORM, as the OTLP receiver stores them; the page is
served by the live portal under its real CSP.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import User

from runs.models import Project
from telemetry.models import Span
from tests.test_browser_runs import PASSWORD, log_in

pytestmark = pytest.mark.django_db(transaction=True)

TRACE = "0af7651916cd43dd8448eb211c80319c"
T0 = datetime(2026, 4, 21, 5, 0, tzinfo=UTC)
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture
def world(live_server) -> dict:
    User.objects.create_user("alice", password=PASSWORD)
    project = Project.objects.create(name="Acme agents", slug="acme")

    def span(n, parent, start, duration, **fields):
        begin = T0 + timedelta(milliseconds=start)
        return Span(
            project=project,
            trace_id=TRACE,
            span_id=f"{n:016x}",
            parent_span_id=f"{parent:016x}" if parent else "",
            start_time=begin,
            end_time=begin + timedelta(milliseconds=duration),
            duration_ms=duration,
            **fields,
        )

    Span.objects.bulk_create(
        [
            span(1, None, 0, 2000, name="gt.session", service="gastown"),
            span(2, 1, 200, 400, name="bd.call", service="bd"),
            span(
                3,
                1,
                800,
                1000,
                name="llm.call",
                service="gastown",
                status_code=Span.StatusCode.ERROR,
                status_message="rate limited",
                attributes={"gen_ai.request.model": "claude-sonnet", "evil": HOSTILE},
                resource={"host.name": "builder-1"},
                events=[
                    {"name": "retry", "time": "2026-04-21T05:00:01.300+00:00", "attributes": {}},
                    {"name": HOSTILE, "time": "2026-04-21T05:00:01.500+00:00", "attributes": {}},
                ],
            ),
        ]
    )
    return {"url": live_server.url}


@pytest.fixture
def page(browser, world):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(8000)
    yield page
    context.close()


def test_clicking_a_span_shows_its_attributes_and_events(page, world):
    from playwright.sync_api import expect

    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    failed: list[str] = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    log_in(page, world)
    page.goto(f"{world['url']}/traces/{TRACE}")
    rows = page.locator("details.span-row")
    expect(rows).to_have_count(3)
    assert rows.locator(".span-name").all_inner_texts() == ["gt.session", "bd.call", "llm.call"]

    # Bars sit on one time axis: llm.call starts 40% in and covers half of it.
    axis = page.locator("details.span-row svg.wf-bar").first.bounding_box()
    bar = rows.nth(2).locator("rect").bounding_box()
    assert bar["x"] - axis["x"] == pytest.approx(axis["width"] * 0.4, abs=2)
    assert bar["width"] == pytest.approx(axis["width"] * 0.5, abs=2)
    red = page.evaluate("getComputedStyle(document.querySelector('rect.bar-error')).fill")
    assert red == "rgb(179, 38, 30)"
    # A child is indented below its parent.
    first, child = (rows.nth(i).locator(".span-name").bounding_box()["x"] for i in (0, 2))
    assert child > first

    page.evaluate("window.__sameDocument = true")
    rows.nth(2).locator("summary").click()
    detail = rows.nth(2).locator(".span-detail")
    expect(detail.locator("table.kv").first).to_be_visible()
    text = detail.inner_text()
    assert "gen_ai.request.model" in text and "claude-sonnet" in text
    assert "builder-1" in text and "rate limited" in text
    assert "retry" in text and "+500 ms" in text
    assert HOSTILE in text  # shown as text…
    assert page.evaluate("window.__pwned === undefined")  # …and never run
    assert page.evaluate("window.__sameDocument") is True  # loaded in place, no reload
    # A narrow screen: the page never scrolls sideways, even with a row open.
    page.set_viewport_size({"width": 375, "height": 800})
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    # No CSP violation, no failed request (but for the favicon Runlens does not have).
    assert [url for url in failed if not url.endswith("/favicon.ico")] == []
    assert [text for text in problems if not text.startswith("Failed to load resource")] == []
