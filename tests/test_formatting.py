"""The read side's one duration formatter (runs/formatting.py) and the filter over it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.template import Context, Template

from runs.formatting import ago, clock, duration


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "—"),
        ("12", "—"),  # not a number: never a 500 on a page
        (True, "—"),
        (-5.0, "—"),
        (0, "0 ms"),  # whole milliseconds (a run, a phase): no decimals
        (5, "5 ms"),
        (0.42, "0.42 ms"),  # a span's float duration keeps three figures
        (40.0, "40.0 ms"),
        (340.4, "340 ms"),
        (999.7, "1.00 s"),
        (1200, "1.20 s"),
        (Decimal("1450.0"), "1.45 s"),  # percentile_cont through a Decimal
        (31_000, "31.0 s"),
        (59_960, "1m 00s"),
        (184_000, "3m 04s"),
        (3_720_000, "1h 02m"),
        (183_600_000, "2d 03h"),
    ],
)
def test_it_says_every_duration_the_same_way(ms, text):
    assert duration(ms) == text


def test_the_filter_takes_milliseconds_or_seconds():
    template = Template('{% load runs_extras %}{{ ms|duration }} · {{ s|duration:"s" }}')
    assert template.render(Context({"ms": 1200, "s": 42})) == "1.20 s · 42.0 s"


def test_it_says_how_long_ago_in_the_doctor_s_words():
    now = datetime(2026, 4, 21, 12, tzinfo=UTC)
    assert ago(None, now) == "never"
    assert ago(now - timedelta(seconds=20), now) == "20s ago"
    assert ago(now - timedelta(minutes=90), now) == "90m ago"
    assert ago(now - timedelta(hours=5), now) == "5h ago"
    assert ago(now + timedelta(seconds=3), now) == "0s ago"  # a clock slightly ahead


def test_a_clock_shows_milliseconds():
    moment = datetime(2026, 4, 21, 5, 12, 34, 567_890, tzinfo=UTC)
    assert clock(moment) == "05:12:34.567" and clock(None) == ""
