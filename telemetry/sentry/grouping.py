"""Which group a Sentry event joins, and the group's title and culprit.

The rules, with worked examples, are in docs/errors.md ("Sentry grouping"). In short:

* a `fingerprint` sent by the SDK wins; each `{{ default }}` in it stands for the
  default key's parts, any other entry is taken as it is;
* an exception groups by the **newest** exception of the chain (the last of
  `exception.values`, the one that reached the handler): its type, its value's first
  line masked (`telemetry.errors.normalize_message`, the masking beacon reports and
  agent events use too) and the top in-app frame's module (or file) and function;
* a message groups by its template when it was sent with parameters, else by its
  masked text.

The event is the canonical one of `telemetry.sentry.events.normalized`; the functions
still check types, so a hand-made event cannot make them raise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from telemetry.errors import (
    MAX_GROUPED_MESSAGE,
    Frame,
    first_line,
    normalize_file,
    normalize_message,
)

# `{{ default }}`, `{{default}}`, `{{  default }}`: Sentry accepts any spacing.
DEFAULT_VARIABLE = re.compile(r"^\{\{\s*default\s*\}\}$")


@dataclass(frozen=True, slots=True)
class Grouping:
    key: str  # hashed into the group's fingerprint (telemetry.errors.Occurrence)
    title: str
    culprit: str


def group(event: dict) -> Grouping:
    parts, title, culprit = default_grouping(event)
    fingerprint = event.get("fingerprint")
    if isinstance(fingerprint, list):
        custom: list[str] = []
        for entry in fingerprint:
            if not isinstance(entry, str):
                continue
            if DEFAULT_VARIABLE.match(entry.strip()):
                custom.extend(parts)
            else:
                custom.append(entry)
        if custom:
            parts = custom
    # JSON keeps the parts apart whatever they contain (a newline, a comma).
    return Grouping(json.dumps(parts, ensure_ascii=False), title, culprit)


def default_grouping(event: dict) -> tuple[list[str], str, str]:
    """(key parts, title, culprit) by Runlens's default rules."""
    transaction = _str(event.get("transaction"))
    exception = newest_exception(event)
    if exception is not None:
        kind, value = _str(exception.get("type")), first_line(_str(exception.get("value")))
        parts = ["exception", kind, normalize_message(value[:MAX_GROUPED_MESSAGE])]
        title = f"{kind}: {value}" if kind and value else kind or value
        frame = top_frame(frames_of(exception))
        if frame is None:
            return parts, title, transaction
        where = _str(frame.get("module")) or _file(frame)
        function = _str(frame.get("function"))
        parts += [normalize_file(where), function]
        culprit = f"{where} in {function}" if where and function else where or function
        return parts, title, culprit or transaction

    logentry = event.get("logentry")
    logentry = logentry if isinstance(logentry, dict) else {}
    template = _str(logentry.get("message"))
    text = _str(logentry.get("formatted")) or template or _str(event.get("message"))
    if template and logentry.get("params"):
        # The template names the bug; the parameters are its values.
        parts = ["message", template[:MAX_GROUPED_MESSAGE]]
    elif text:
        parts = ["message", normalize_message(text[:MAX_GROUPED_MESSAGE])]
    else:
        parts = ["event", transaction]
    return parts, first_line(text), transaction


def newest_exception(event: dict) -> dict | None:
    """The last of `exception.values` (Sentry sends them oldest to newest) that says
    something: in `raise X from Y`, X."""
    exception = event.get("exception")
    values = exception.get("values") if isinstance(exception, dict) else None
    if not isinstance(values, list):
        return None
    for value in reversed(values):
        if isinstance(value, dict) and (value.get("type") or value.get("value")):
            return value
    return None


def frames_of(exception: dict) -> list[dict]:
    """An exception's frames, oldest call first (the crashing frame last)."""
    stacktrace = exception.get("stacktrace")
    frames = stacktrace.get("frames") if isinstance(stacktrace, dict) else None
    if not isinstance(frames, list):
        return []
    return [frame for frame in frames if isinstance(frame, dict)]


def top_frame(frames: list[dict]) -> dict | None:
    """The crashing end's first in-app frame; the crashing frame when none is in app."""
    for frame in reversed(frames):
        if frame.get("in_app") is True:
            return frame
    return frames[-1] if frames else None


def _file(frame: dict) -> str:
    # A path without origin or query: a CDN host or a cache-busting query is not the bug.
    file = _str(frame.get("filename")) or _str(frame.get("abs_path"))
    return Frame("", file).location if file else ""


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
