"""Ratios for the metrics dashboard (plain text out). Durations: `runs_extras.duration`."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def percent(value: float | None) -> str:
    """0.9534 -> 95.3 %."""
    if value is None:
        return "—"
    return f"{value * 100:.1f} %"
