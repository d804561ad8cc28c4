"""The run pages in a real browser (Debian's Chromium through Playwright).

Events reach the live portal over HTTP, through the real ingest endpoint. Celery
runs eagerly in this process and the live server commits each request, so a
batch is stored by the time its POST returns.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from django.contrib.auth.models import User

from runs.models import Artifact, Project, Run

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct horse battery"
PATCH = b"""diff --git a/README.md b/README.md
--- a/README.md
+++ b/README.md
@@ -1,3 +1,3 @@
 # Hello
-old line
+new line
 keep
"""
XSS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2">',
    "javascript:window.__pwned=3",
    '<a href="/x" hx-get="/api/runs" hx-trigger="load">hx</a>',
    '<div hx-get="/logout/" hx-trigger="load" hx-on:htmx:load="window.__pwned=4">d</div>',
]


@pytest.fixture
def world(live_server) -> dict:
    User.objects.create_user("alice", password=PASSWORD)
    project = Project.objects.create(name="Acme agents", slug="acme")
    return {"url": live_server.url, "token": project.create_token()}


@pytest.fixture
def page(browser, world):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(8000)
    yield page
    context.close()


def send(world: dict, run_id: str, *records: dict) -> None:
    """POST records to the live portal's ingest endpoint, as an agent would."""
    body = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    request = urllib.request.Request(
        f"{world['url']}/api/ingest/events?run_id={run_id}",
        data=body,
        headers={
            "Authorization": f"Bearer {world['token']}",
            "Content-Type": "application/x-ndjson",
        },
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 202


def rec(event: str, second: int = 0, **fields) -> dict:
    return {
        "ts": f"2026-04-21T05:12:{second:02d}.000+00:00",
        "slug": fields.pop("slug", "octocat__hello-world"),
        "phase": fields.pop("phase", ""),
        "level": fields.pop("level", "info"),
        "event": event,
        "data": fields.pop("data", {}),
        **fields,
    }


def log_in(page, world: dict) -> None:
    page.goto(f"{world['url']}/login/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{world['url']}/")


def test_an_operator_opens_a_run_filters_its_timeline_and_reads_a_diff(page, world):
    from playwright.sync_api import expect

    send(
        world,
        "run-1",
        rec("run.begin", 0),
        rec("phase.start", 1, data={"phase": "WORKING"}),
        rec("llm.call", 2, data={"model": "m", "tokens_in": 10}),
        rec("git.commit", 3, data={"sha": "a1b2c3d"}),
        rec("llm.call", 4, data={"model": "m", "tokens_in": 5}),
        rec("run.exit_clean", 5),
    )
    Artifact.store(Run.objects.get(run_id="run-1"), "diff.patch", PATCH, "text/x-diff")

    log_in(page, world)
    assert page.title() == "Runs · Runlens"
    page.click(f"a#run-{Run.objects.get().pk}")
    page.wait_for_selector("#events li.event")
    assert page.locator("#events li.event").count() == 6

    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    page.click("nav.chips >> text=llm.")
    # (No wait_for_function: it evaluates strings, which our CSP forbids.)
    expect(page.locator("#events li.event")).to_have_count(2)
    names = page.locator("#events li.event .name").all_inner_texts()
    assert names == ["llm.call", "llm.call"]
    assert page.evaluate("window.__sameDocument") is True  # a fragment swap, not a reload
    assert "filter=llm." in page.url  # the filtered view is shareable
    page.locator("#events li.event details summary").first.click()
    assert '"tokens_in": 10' in page.locator("#events li.event pre").first.inner_text()

    # Keyboard focus is visible on the chips.
    page.keyboard.press("Tab")
    page.locator("nav.chips a").first.focus()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"

    page.click("text=diff.patch")
    page.wait_for_selector("table.diff-table")
    assert page.title().startswith("diff.patch")
    added = page.locator("tr.add td.code")
    assert added.inner_text() == "new line"
    assert page.locator("tr.del td.code").inner_text() == "old line"
    green = page.evaluate(
        "getComputedStyle(document.querySelector('tr.add td.code')).backgroundColor"
    )
    assert green == "rgb(232, 247, 236)"

    # A narrow screen: the page itself never scrolls sideways (wide tables do, inside).
    for url in ("/", "/runs/run-1"):
        page.set_viewport_size({"width": 375, "height": 800})
        page.goto(world["url"] + url)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        # What sticks out, should it fail: tag, class and right edge of the first few.
        wide = page.eval_on_selector_all(
            "body *",
            """els => els.filter(e => e.getBoundingClientRect().right > 376).slice(0, 8)
                .map(e => `${e.tagName}.${e.className} ${e.getBoundingClientRect().right}`)""",
        )
        assert overflow <= 1, (url, wide)


def test_a_live_run_receives_new_events_without_a_reload(page, world):
    send(world, "live-1", rec("run.begin", 0), rec("phase.start", 1, data={"phase": "WORKING"}))
    log_in(page, world)
    page.goto(f"{world['url']}/runs/live-1")
    page.wait_for_selector("#timeline-next.follow")
    page.evaluate("window.__sameDocument = true")

    send(world, "live-1", rec("llm.call", 2), rec("git.commit", 3, message="pushed"))
    page.wait_for_selector("#e4", timeout=6000)
    assert page.locator("#e4 .message").inner_text() == "pushed"
    assert page.locator("#events li.event").count() == 4  # new rows only, nothing twice

    send(world, "live-1", rec("run.exit_clean", 4))
    page.wait_for_selector("#timeline-end", timeout=6000)
    assert "succeeded" in page.locator("#timeline-end").inner_text()
    assert page.locator("#run-summary .badge").inner_text() == "Succeeded"
    assert page.evaluate("window.__sameDocument") is True

    # The 286 answer ended the polling: no more requests.
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.wait_for_timeout(2600)
    assert requests == []


def test_xss_payloads_in_events_show_as_text_and_run_nothing(page, world):
    send(
        world,
        "evil",
        rec(
            "run.begin",
            0,
            slug="evil" + XSS[0],
            message=" ".join(XSS),
            data={"tags": XSS, "attributes": {"note": XSS[4]}, "url": XSS[2], "html": XSS[1]},
        ),
        rec("tool." + XSS[1], 1, level="error", message=XSS[3], data={"pr_url": XSS[2]}),
        rec("note", 2, phase="<b>x</b>", message=XSS[4]),
        rec("run.exit_clean", 3),
    )
    Artifact.store(Run.objects.get(), XSS[1][:60] + ".txt", XSS[0].encode(), "text/plain")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, world)

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{world['url']}/runs/evil")
    page.wait_for_load_state("networkidle")
    requests.clear()
    for summary in page.locator("details summary").all():
        summary.click()
    page.locator("#events").hover()
    page.wait_for_timeout(500)
    assert requests == []  # nothing an event said made the page fetch anything
    messages = page.locator("#events .message").all_inner_texts()
    assert XSS[3] in messages and XSS[4] in messages  # shown as text
    assert page.locator("#events img, #events script, #events [hx-get]").count() == 0
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    assert not [h for h in hrefs if h.strip().lower().startswith("javascript:")]
    assert page.evaluate("window.__pwned") is None

    page.goto(world["url"] + "/")
    page.wait_for_load_state("networkidle")
    assert page.locator("#runs td.slug").first.inner_text() == "evil" + XSS[0]
    page.goto(f"{world['url']}/artifacts/{Artifact.objects.get().pk}/")
    assert page.locator("pre.text").inner_text() == XSS[0]
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
