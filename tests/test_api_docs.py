"""/api/docs: Swagger UI from static/, under our own Content-Security-Policy."""

from __future__ import annotations

import pytest
from django.conf import settings


def test_the_page_loads_swagger_ui_from_static_with_no_inline_script(client, db):
    response = client.get("/api/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assert response["Content-Security-Policy"] == settings.CONTENT_SECURITY_POLICY
    assert "/static/vendor/swagger-ui-5.35.0/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower() and "https://" not in html
    # Every <script> has a src: an inline one would be blocked by script-src 'self'.
    assert html.count("<script") == html.count("<script src=")


def test_the_vendored_files_are_served(client, db):
    for path in ("vendor/swagger-ui-5.35.0/swagger-ui-bundle.js", "runlens-api-docs.js"):
        assert client.get(f"/static/{path}").status_code == 200, path


@pytest.mark.django_db(transaction=True)
def test_in_a_real_browser_the_operations_render_without_a_csp_violation(live_server, browser):
    context = browser.new_context()
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if m.type == "error" else None)
    try:
        page.goto(f"{live_server.url}/api/docs")
        page.wait_for_selector(".opblock-summary", timeout=15000)
        operations = page.locator(".opblock-summary").count()
        assert operations >= 20
        assert "Runlens API" in page.locator(".title").first.inner_text()
        assert not [v for v in violations if "Content Security Policy" in v], violations
    finally:
        context.close()
