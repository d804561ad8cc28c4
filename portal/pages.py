"""Rendering an operator page or the htmx fragment of it: the one helper every page uses.

One template per page; an htmx request gets a named partial (`{% partialdef %}`) of
the same template, so the page and its fragments never drift. Both apps' views call
`page()`; it lives here because `runs` must not import `telemetry` and the pages of
both need it.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers

ANY_TARGET = "*"


def page(
    request: HttpRequest,
    template: str,
    context: dict,
    partials: Mapping[str, str] | None = None,
    status: int = 200,
) -> HttpResponse:
    """Render `template`, or the partial that the htmx request's target asks for.

    `partials` maps an `HX-Target` (an element id) to the partial rendered for it;
    the key `ANY_TARGET` names the partial for any other htmx request (a target
    without an id, such as `find .span-detail`). A history restore (the cache missed
    after "back") always gets the whole page.
    """
    htmx = getattr(request, "htmx", None)
    name = ""
    if htmx and not htmx.history_restore_request and partials:
        name = partials.get(htmx.target or "", partials.get(ANY_TARGET, ""))
    response = render(request, f"{template}#{name}" if name else template, context, status=status)
    # One URL, several bodies: a cached fragment must never stand in for the page
    # (back button, bfcache, a proxy).
    patch_vary_headers(response, ("HX-Request", "HX-Target"))
    return response
