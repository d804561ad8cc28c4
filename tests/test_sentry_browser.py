"""The real `@sentry/browser` in Chromium: a web app on another origin reports to Runlens.

The SDK is the npm registry's package, installed for the tests only
(`npm ci --prefix tests/js`, which .ci/run does); it is never a runtime dependency.
Since version 8 the npm package ships no CDN bundle, only ES modules, so the page
loads them as a bundler would resolve them: an import map built from each
installed package's `exports`. The page is served by a small server of this test on
its own origin (127.0.0.1 and its own port; the portal is `live_server`), inits the
SDK with the project's DSN, changing nothing else, and throws an uncaught error.
"""

from __future__ import annotations

import json
import mimetypes
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runs.models import Project
from telemetry.models import ErrorGroup, ErrorReport

pytestmark = pytest.mark.django_db(transaction=True)

NODE_MODULES = Path(__file__).resolve().parent / "js" / "node_modules"
HOSTILE = "<img src=x onerror=alert(1)>"
# Export conditions a browser bundler honours, and the production build of the SDK.
CONDITIONS = ("browser", "production", "import", "default")

APP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Some web app</title>
<script type="importmap">{imports}</script>
</head><body><p>app</p>
<script type="module">
  import * as Sentry from "@sentry/browser";
  Sentry.init({{dsn: {dsn}, release: "web@2.0.1", environment: "production"}});
  window.__sentry_version = Sentry.SDK_VERSION;
  function renderCart(items) {{ throw new TypeError({message}); }}
  function onCheckout() {{ renderCart([]); }}
  setTimeout(onCheckout, 0);
</script>
</body></html>
"""


def js_string(text: str) -> str:
    """A JavaScript string literal that cannot end the inline <script> holding it."""
    return json.dumps(text).replace("</", "<\\/")


def _resolve(target) -> str | None:
    """The file an `exports` entry gives a browser (first matching condition wins)."""
    if isinstance(target, str):
        return target
    if isinstance(target, dict):
        for condition, value in target.items():
            if condition in CONDITIONS and (found := _resolve(value)):
                return found
    return None


def import_map(node_modules: Path, prefix: str) -> dict[str, str]:
    """Bare specifier -> URL for every installed package, from its package.json."""
    imports = {}
    for manifest in node_modules.glob("**/package.json"):
        package = manifest.parent
        if package.parent.name != "node_modules" and package.parent.parent.name != "node_modules":
            continue  # a package.json inside a package's build folders
        meta = json.loads(manifest.read_text())
        name = meta.get("name")
        if not name or package.relative_to(node_modules).as_posix() != name:
            continue
        exports = meta.get("exports")
        if not isinstance(exports, dict) or not all(k.startswith(".") for k in exports):
            exports = {".": exports or meta.get("module") or meta.get("main") or "index.js"}
        for subpath, target in exports.items():
            file = _resolve(target)
            if file and file.endswith((".js", ".mjs")) and "*" not in subpath:
                specifier = name + subpath.removeprefix(".")
                imports[specifier] = f"{prefix}/{name}/{file.removeprefix('./')}"
    return imports


@pytest.fixture(scope="module")
def sentry_modules() -> Path:
    """tests/js/node_modules, or a skip outside CI (a failure under CI=true)."""
    if not (NODE_MODULES / "@sentry" / "browser" / "package.json").exists():
        reason = "@sentry/browser is not installed: run `npm ci --prefix tests/js`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return NODE_MODULES


@pytest.fixture
def app_origin(sentry_modules):
    """A tiny web app on its own origin: the page, and the SDK's modules under /js/."""
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(holder["page"].encode(), "text/html; charset=utf-8")
                return
            file = (sentry_modules / path.removeprefix("/js/")).resolve()
            inside = path.startswith("/js/") and file.is_relative_to(sentry_modules)
            if not inside or not file.is_file():
                self.send_error(404)
            else:
                kind = "text/javascript" if file.suffix in (".js", ".mjs") else None
                kind = kind or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(file.read_bytes(), kind)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    imports = json.dumps({"imports": import_map(sentry_modules, origin + "/js")})

    def serve(dsn: str, message: str) -> str:
        holder["page"] = APP_PAGE.format(
            imports=imports.replace("</", "<\\/"), dsn=js_string(dsn), message=js_string(message)
        )
        return origin + "/"

    yield origin, serve
    server.shutdown()
    server.server_close()


@pytest.fixture
def portal_url(live_server, settings) -> str:
    """The live portal, and the DSNs it hands out pointing at it."""
    settings.RUNLENS_URL = live_server.url
    assert not live_server.url.startswith("http://127.0.0.1:")  # "localhost": another origin
    return live_server.url


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def carries_event(request) -> bool:
    """The envelope of the error (the SDK also sends one for the page's session)."""
    return "/envelope/" in request.url and '"type":"event"' in (request.post_data or "")


def open_app(page, url: str):
    """Load the app page; returns the portal's answer to the SDK's error envelope."""
    with page.expect_response(lambda r: carries_event(r.request), timeout=15_000) as answer:
        page.goto(url)
    return answer.value


def test_an_uncaught_error_on_an_allowed_origin_arrives_with_the_browsers_frames(
    portal_url, app_origin, browser
):
    origin, serve = app_origin
    project = Project.objects.create(name="Web app", slug="web", allowed_origins=origin)
    app = browser.new_page()
    answer = open_app(app, serve(project.dsn, "items is empty"))

    assert answer.status == 200, answer.text()
    assert answer.headers["access-control-allow-origin"] == origin
    assert answer.request.headers["content-type"].startswith("text/plain")  # no preflight
    assert wait_for(lambda: ErrorReport.objects.filter(project=project).exists())
    report = ErrorReport.objects.get(project=project)
    assert answer.json() == {"id": report.event_id}
    event = report.event
    assert report.source == "sentry" and report.group.source == "sentry"
    assert (report.release, report.environment) == ("web@2.0.1", "production")
    assert report.error == "TypeError: items is empty"
    assert event["sdk"]["name"] == "sentry.javascript.browser"
    assert event["sdk"]["version"] == app.evaluate("window.__sentry_version")
    assert event["platform"] == "javascript"
    assert event["request"]["url"] == origin + "/"
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "TypeError" and exception["mechanism"]["handled"] is False
    frames = exception["stacktrace"]["frames"]
    # Oldest call first, the crashing frame last, as Sentry stores them.
    assert [f["function"] for f in frames][-2:] == ["onCheckout", "renderCart"]
    assert frames[-1]["filename"] == origin + "/"
    assert frames[-1]["lineno"] > 1 and frames[-1]["colno"] > 1
    assert "Chrome" in json.dumps(event["request"]["headers"])


def test_an_origin_the_project_does_not_allow_is_refused_and_nothing_is_stored(
    portal_url, app_origin, browser, caplog
):
    origin, serve = app_origin
    project = Project.objects.create(
        name="Web app", slug="web", allowed_origins="https://shop.example.com"
    )
    app = browser.new_page()
    # No CORS header names the page's origin: the browser lets the page read nothing,
    # not even the status, and the request fails for it.
    with app.expect_event("requestfailed", carries_event, timeout=15_000) as failed:
        app.goto(serve(project.dsn, "items is empty"))
    assert failed.value.failure  # net::ERR_FAILED
    refused = [
        r.status_code
        for r in caplog.records
        if r.name == "django.request" and r.request.path == f"/api/{project.pk}/envelope/"
    ]
    assert refused and set(refused) == {403}
    time.sleep(0.5)  # had it been accepted, the (eager) worker would have stored it by now
    assert not ErrorReport.objects.exists()


def test_a_hostile_error_message_from_the_sdk_shows_as_text_on_the_group_page(
    portal_url, app_origin, browser, operator
):
    origin, serve = app_origin
    project = Project.objects.create(name="Web app", slug="web", allowed_origins=origin)
    app = browser.new_page()
    dialogs: list[str] = []
    app.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    assert open_app(app, serve(project.dsn, HOSTILE)).status == 200
    assert wait_for(lambda: ErrorReport.objects.filter(project=project).exists())
    group = ErrorGroup.objects.get(source="sentry")
    assert group.title == f"TypeError: {HOSTILE}"

    portal = browser.new_page()
    portal.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    portal.goto(f"{portal_url}/login/?next=/errors/{group.pk}")
    portal.fill("#id_username", "alice")
    portal.fill("#id_password", "correct horse battery")
    portal.click("button[type=submit]")
    portal.wait_for_url(f"**/errors/{group.pk}")
    title = portal.locator("h1.error-title")
    assert HOSTILE in title.inner_text()
    assert HOSTILE in portal.locator("main").inner_text()
    assert portal.locator("main img").count() == 0
    portal.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert dialogs == []
