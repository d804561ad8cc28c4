"""Geometry for the server-rendered SVG charts: numbers in, coordinates and labels out.

No markup is built here. Templates draw the SVG from these objects, so every label
(slugs and model names are agent data) goes through Django's autoescaping, and only
numbers and our own palette end up in attributes. The CSP allows no inline styles:
colours are SVG presentation attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

PALETTE = ("#2f5bd3", "#d9822b", "#1b7f3b", "#b3261e", "#7a4cc2", "#0f8a8a", "#8a8f9c")
WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 28


def nice_ceiling(value: float) -> float:
    """The next 1, 2, 2.5 or 5 x 10^n at or above value (axis tops read well)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude + 1e-12:
            return step * magnitude
    return 10 * magnitude


def compact(value: float, unit: str = "") -> str:
    """12, 1.5k, 3.2M; small fractions kept (costs); the unit appended."""
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= 1_000_000_000:
        text = f"{value / 1_000_000_000:.3g}G"
    elif value >= 1_000_000:
        text = f"{value / 1_000_000:.3g}M"
    elif value >= 10_000:
        text = f"{value / 1_000:.3g}k"
    elif value >= 100 or value == int(value):
        text = f"{value:,.0f}"
    elif value >= 1:
        text = f"{value:.2f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:.4f}".rstrip("0").rstrip(".") or "0"
    if unit in ("usd", "USD", "$"):
        return f"{sign}${text}"
    return f"{sign}{text}{' ' + unit if unit else ''}"


@dataclass
class Tick:
    position: float  # x for the time axis, y for the value axis
    label: str


@dataclass
class Point:
    x: float
    y: float
    label: str  # the tooltip (<title>)


@dataclass
class Series:
    label: str
    colour: str
    points: list[Point] = field(default_factory=list)

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_width: int = WIDTH - LEFT - RIGHT
    plot_height: int = HEIGHT - TOP - BOTTOM
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    unit: str = ""
    empty: bool = True

    @property
    def bottom(self) -> int:
        return self.top + self.plot_height

    @property
    def right(self) -> int:
        return self.left + self.plot_width

    @property
    def x_label_y(self) -> int:
        return self.bottom + 18


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str


def _time_label(moment: datetime, span: timedelta) -> str:
    if span <= timedelta(days=1):
        return moment.strftime("%H:%M")
    if span <= timedelta(days=8):
        return moment.strftime("%a %H:%M")
    return moment.strftime("%b %d")


def _value_axis(chart: Chart, top_value: float, unit: str) -> float:
    top_value = nice_ceiling(top_value)
    for i in range(5):
        value = top_value * i / 4
        y = chart.bottom - chart.plot_height * i / 4
        chart.y_ticks.append(Tick(round(y, 1), compact(value, unit)))
    return top_value


def line_chart(
    data: dict[str, list[tuple[datetime, float, int]]],
    start: datetime,
    end: datetime,
    unit: str = "",
) -> Chart:
    """One line per series over [start, end]; points carry value, time and sample count."""
    chart = Chart(unit=unit)
    span = max(end - start, timedelta(seconds=1))
    values = [v for points in data.values() for _, v, _ in points]
    chart.empty = not values
    low = min(values, default=0.0)
    top = _value_axis(chart, max(values, default=0.0) if low >= 0 else max(map(abs, values)), unit)
    floor = 0.0 if low >= 0 else -top
    if floor:
        chart.y_ticks = []
        for i in range(5):
            value = floor + (top - floor) * i / 4
            y = chart.bottom - chart.plot_height * i / 4
            chart.y_ticks.append(Tick(round(y, 1), compact(value, unit)))
    for i in range(6):
        moment = start + span * i / 5
        chart.x_ticks.append(
            Tick(round(chart.left + chart.plot_width * i / 5, 1), _time_label(moment, span))
        )
    for n, (label, points) in enumerate(data.items()):
        series = Series(label, PALETTE[n % len(PALETTE)])
        for moment, value, count in points:
            x = chart.left + chart.plot_width * ((moment - start) / span)
            y = chart.bottom - chart.plot_height * (value - floor) / (top - floor)
            tip = f"{label} · {moment:%Y-%m-%d %H:%M} UTC · {compact(value, unit)}"
            if count > 1:
                tip += f" (average of {count})"
            series.points.append(Point(round(x, 1), round(y, 1), tip))
        chart.series.append(series)
    return chart


def stacked_bars(days: list[datetime], data: dict[str, list[float]], unit: str = "usd") -> Chart:
    """A bar per day, stacked by series (cost per slug and day)."""
    chart = Chart(unit=unit)
    totals = [sum(values[i] for values in data.values()) for i in range(len(days))]
    chart.empty = not any(totals)
    top = _value_axis(chart, max(totals, default=0.0), unit)
    slot = chart.plot_width / max(1, len(days))
    width = max(2.0, slot * 0.7)
    every = max(1, math.ceil(len(days) / 10))  # at most about ten day labels
    for i, day in enumerate(days):
        x = chart.left + slot * i + (slot - width) / 2
        if i % every == 0:
            chart.x_ticks.append(Tick(round(x + width / 2, 1), day.strftime("%b %d")))
        base = float(chart.bottom)
        for n, (label, values) in enumerate(data.items()):
            value = values[i]
            if value <= 0:
                continue
            height = chart.plot_height * value / top
            base -= height
            chart.bars.append(
                Bar(
                    round(x, 1),
                    round(base, 1),
                    round(width, 1),
                    round(height, 1),
                    PALETTE[n % len(PALETTE)],
                    f"{label} · {day:%Y-%m-%d} · {compact(value, unit)}",
                )
            )
    chart.series = [Series(label, PALETTE[n % len(PALETTE)]) for n, label in enumerate(data)]
    return chart


@dataclass
class Sparkline:
    width: int
    height: int
    points: str
    low: float
    high: float


def sparkline(values: list[float], width: int = 120, height: int = 24) -> Sparkline | None:
    """A polyline of values in order, scaled to their own range; None for fewer than two."""
    if len(values) < 2:
        return None
    low, high = min(values), max(values)
    spread = (high - low) or 1.0
    step = (width - 2) / (len(values) - 1)
    coords = " ".join(
        f"{1 + i * step:.1f},{height - 2 - (v - low) / spread * (height - 4):.1f}"
        for i, v in enumerate(values)
    )
    return Sparkline(width, height, coords, low, high)
