"""Formatting for the run pages. Every filter returns plain text: autoescaping still applies."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlsplit

from django import template
from django.utils import timezone

from runs.models import LEVELS

register = template.Library()


@register.filter
def duration(ms: int | None) -> str:
    """450 ms, 12.3 s, 3m 04s, 1h 02m, 2d 03h."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


@register.filter
def age(moment: datetime | None) -> str:
    """How long ago, as `doctor --runs` says it: 12s ago, 5m ago, 3h ago, never."""
    if moment is None:
        return "never"
    seconds = max(0, int((timezone.now() - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@register.filter
def thousands(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


@register.filter
def usd(value: Decimal | float | None) -> str:
    if not value:
        return "—"
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


@register.filter
def pretty_json(value) -> str:
    """Indented JSON for a <pre>; the template escapes it like any other text."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@register.filter
def level_class(level: str) -> str:
    """A CSS class for a level, from a fixed set whatever the value."""
    return f"lvl-{level}" if level in LEVELS else "lvl-info"


@register.filter
def http_url(value) -> str:
    """The value if it is an absolute http(s) URL, else "": the only URLs that become links.

    Agent data may hold `javascript:` or `data:` URLs; those stay text.
    """
    if not isinstance(value, str) or len(value) > 2000:
        return ""
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return ""
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        return value.strip()
    return ""


@register.filter
def links(data) -> list[tuple[str, str]]:
    """Top-level `…url` fields of event data that are safe http(s) links (a PR, a CI job)."""
    if not isinstance(data, dict):
        return []
    found = []
    for key, value in list(data.items())[:50]:
        if isinstance(key, str) and key.lower().endswith("url") and (url := http_url(value)):
            found.append((key, url))
    return found[:5]


@register.filter
def short(value: str, size: int = 12) -> str:
    value = str(value)
    return value if len(value) <= size else value[: size - 1] + "…"


@register.filter
def pairs(mapping) -> list[tuple[str, object]]:
    """A dict's items, sorted. (`dict.items` in a template would look up a key "items".)"""
    if not isinstance(mapping, dict):
        return []
    return sorted(mapping.items(), key=lambda item: str(item[0]))


@register.filter
def as_text(value) -> str:
    """A JSON value in one line: strings as they are, the rest as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


@register.filter
def clock(moment: datetime | None) -> str:
    """Time of day to the millisecond (UTC): what a timeline row needs."""
    if moment is None:
        return ""
    moment = timezone.localtime(moment)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
