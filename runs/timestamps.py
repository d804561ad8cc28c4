"""Timestamps as agents write them: ISO 8601 text or epoch seconds (or milliseconds).

One reader for record `ts` fields and for the `since`/`until` of the read API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


class TimestampError(ValueError):
    """The message names the problem for the client (`ts: …`)."""


def parse_timestamp(value: Any, name: str = "ts") -> datetime:
    """An aware UTC datetime, or TimestampError naming what is wrong."""
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)  # the usual, canonical form, as is
        except ValueError:
            text = value.strip()
            if text.endswith(("Z", "z")):
                text = text[:-1] + "+00:00"
            try:
                ts = datetime.fromisoformat(text)
            except ValueError:
                raise TimestampError(f"{name}: not an ISO 8601 timestamp") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if value > 100_000_000_000 else value
        try:
            ts = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise TimestampError(f"{name}: epoch value out of range") from None
    elif value is None:
        raise TimestampError(f"{name}: required")
    else:
        raise TimestampError(f"{name}: must be an ISO 8601 string or epoch seconds")
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    elif ts.tzinfo is not UTC:
        # In UTC: PostgreSQL refuses offsets beyond ±15:59, which Python reads (up
        # to ±23:59), and one refused row would fail the whole batch's COPY.
        try:
            ts = ts.astimezone(UTC)
        except OverflowError:
            raise TimestampError(f"{name}: year out of range") from None
    if not 1970 <= ts.year <= 9999:
        raise TimestampError(f"{name}: year out of range")
    return ts
