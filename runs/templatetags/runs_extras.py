"""Formatting for the run pages. Every filter returns plain text: autoescaping still applies."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlsplit

from django import template

from runs import formatting
from runs.models import LEVELS

register = template.Library()


@register.filter
def duration(value: float | Decimal | None, unit: str = "ms") -> str:
    """A duration in milliseconds (`|duration`) or seconds (`|duration:"s"`): 340 ms,
    1.20 s, 3m 04s, 2d 03h. The one formatter of the read side (runs/formatting.py)."""
    if unit == "s" and isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        value = value * 1000
    return formatting.duration(value)


@register.filter
def age(moment: datetime | None) -> str:
    """How long ago, as `doctor --runs` says it: 12s ago, 5m ago, 3h ago, never."""
    return formatting.ago(moment)


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
    return formatting.clock(moment)
