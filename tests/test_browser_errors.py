"""The beacon in a real browser: a web app on another origin reports to Runlens.

A page served by this test (its own origin, like any web app) includes
runlens-beacon.js from the live portal, throws an error and rejects a promise
in Debian's Chromium. Both reports must arrive, group, and show on the errors
page, with the XSS payloads in their messages shown as text and never run.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.auth.models import User

from runs.models import Project
from telemetry.models import ErrorGroup, ErrorReport

pytestmark = pytest.mark.django_db(transaction=True)

THROWN = '<img src=x onerror="window.__pwned=1">'
REJECTED = "<script>window.__pwned=2</script>"

APP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Some web app</title>
<script src="{portal}/static/runlens-beacon.js" data-key="{key}" data-build="web-1.2.3"></script>
</head><body><p>app</p>
<script>
  function boom() {{ throw new TypeError({thrown}); }}
  // A burst of the same error: the beacon sends it once.
  setTimeout(boom, 0);
  setTimeout(boom, 5);
  setTimeout(boom, 10);
  Promise.reject(new Error({rejected}));
</script>
</body></html>
"""


def js_string(text: str) -> str:
    """A JavaScript string literal that cannot end the inline <script> holding it."""
    return json.dumps(text).replace("</", "<\\/")


@pytest.fixture
def app_origin(live_server):
    """A tiny web app on its own origin: the page above, nothing else."""
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = holder["page"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", holder
    server.shutdown()
    server.server_close()


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_errors_of_a_web_app_are_reported_grouped_and_shown_as_text(
    live_server, app_origin, browser
):
    origin, holder = app_origin
    project = Project.objects.create(name="Web app", slug="web", allowed_origins=origin)
    holder["page"] = APP_PAGE.format(
        portal=live_server.url,
        key=project.public_key,
        thrown=js_string(THROWN),
        rejected=js_string(REJECTED),
    )
    User.objects.create_user("alice", password="correct horse battery")

    app = browser.new_page()
    app.goto(origin + "/")
    assert wait_for(lambda: ErrorReport.objects.count() >= 2), "the beacons did not arrive"
    time.sleep(1.0)  # the rest of the burst, had the beacon not deduplicated it
    reports = ErrorReport.objects.select_related("group").order_by("group__title")
    assert [(r.group.title, r.project_id) for r in reports] == [
        (f"Error: {REJECTED}", project.pk),
        (f"TypeError: {THROWN}", project.pk),
    ]
    thrown = reports[1]
    assert thrown.group.culprit == "boom (/)"
    assert thrown.context["build"] == "web-1.2.3" and thrown.context["url"] == origin + "/"
    assert "HeadlessChrome" in thrown.context["ua"] or "Chrome" in thrown.context["ua"]
    assert thrown.request_id and reports[0].context["kind"] == "unhandledrejection"

    # The operator's view: payloads are text, nothing runs, nothing breaks the CSP.
    portal = browser.new_page()
    dialogs: list[str] = []
    console_errors: list[str] = []
    portal.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    portal.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
    portal.goto(live_server.url + "/login/?next=/errors")
    portal.fill("#id_username", "alice")
    portal.fill("#id_password", "correct horse battery")
    portal.click("button[type=submit]")
    portal.wait_for_url("**/errors")
    table = portal.locator("#groups")
    assert THROWN in table.inner_text() and REJECTED in table.inner_text()
    assert table.locator("img, script").count() == 0
    assert portal.locator("svg.spark").count() == 2

    portal.click(f"text=TypeError: {THROWN}")
    portal.wait_for_selector("table.frames")
    assert portal.locator("table.frames code").first.inner_text() == "boom"
    assert THROWN in portal.locator("h1.error-title").inner_text()
    portal.click("#group-status button:has-text('Resolve')")
    portal.wait_for_selector("#group-status .status-resolved")
    assert ErrorGroup.objects.get(pk=thrown.group_id).status == "resolved"

    assert portal.evaluate("window.__pwned") is None
    assert app.evaluate("window.__pwned") is None
    assert dialogs == []
    assert not [m for m in console_errors if "Content Security Policy" in m], console_errors
