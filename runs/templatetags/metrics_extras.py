"""Number formatting for the metrics dashboard and the status page (plain text out)."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def percent(value: float | None) -> str:
    """0.9534 -> 95.3 %."""
    if value is None:
        return "—"
    return f"{value * 100:.1f} %"


@register.filter
def ms(value: float | None) -> str:
    """A latency in milliseconds: 850 ms, 1.25 s, 2m 05s."""
    if value is None:
        return "—"
    if value < 1000:
        return f"{value:.0f} ms"
    seconds = value / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{int(seconds) // 60}m {int(seconds) % 60:02d}s"


@register.filter
def seconds(value: int | float | None) -> str:
    """An age or uptime in seconds: 42 s, 5m 03s, 2h 10m, 3d 04h."""
    if value is None:
        return "—"
    value = int(value)
    if value < 60:
        return f"{value} s"
    if value < 3600:
        return f"{value // 60}m {value % 60:02d}s"
    if value < 86400:
        return f"{value // 3600}h {value % 3600 // 60:02d}m"
    return f"{value // 86400}d {value % 86400 // 3600:02d}h"
