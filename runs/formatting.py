"""How the read side says a duration, an age and a time of day: one owner for each.

The pages (through the `duration`, `age` and `clock` filters of `runs_extras`), the
trace views and the terminal commands (`doctor`, `logs`) all call these, so a span,
a run and a provider's latency read the same everywhere. Plain text out.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.utils import timezone

NONE = "—"


def duration(ms: float | Decimal | None) -> str:
    """A duration in milliseconds, to three significant figures below a minute.

    0.42 ms, 40.0 ms, 340 ms, 1.20 s, 31.0 s, 3m 04s, 1h 02m, 2d 03h. A whole number
    of milliseconds (a run's or a phase's duration) has no decimals below a second:
    5 ms, not 5.00 ms; a span's float duration keeps them.
    """
    if ms is None or isinstance(ms, bool) or not isinstance(ms, int | float | Decimal):
        return NONE
    if isinstance(ms, int) and 0 <= ms < 1000:
        return f"{ms} ms"
    ms = float(ms)
    if ms < 0:
        return NONE
    for limit, places in ((10, 2), (100, 1), (999.5, 0)):
        if ms < limit:
            return f"{ms:.{places}f} ms"
    seconds = ms / 1000
    for limit, places in ((9.995, 2), (59.95, 1)):
        if seconds < limit:
            return f"{seconds:.{places}f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago, as `doctor --runs` says it: 12s ago, 5m ago, 3h ago, never.

    Hours from two hours on, days from two days on: "90m ago" reads better than "1h ago".
    """
    if moment is None:
        return "never"
    seconds = max(0, int(((now or timezone.now()) - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def clock(moment: datetime | None) -> str:
    """Time of day to the millisecond, in the portal's time zone (UTC): a timeline row's."""
    if moment is None:
        return ""
    moment = timezone.localtime(moment)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
