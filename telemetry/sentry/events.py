"""One Sentry event, as SDKs send it, made into the event Runlens stores.

`normalized()` takes the JSON of an envelope's `event` item or of a `/store/` body
(Python, JavaScript, Node, a bash `curl`) and returns Sentry's own shape with the
loose parts made canonical (docs/errors.md, "Sentry grouping"; the shape is the one
of the brief "sentry-shape"):

* `exception` is `{"values": [...]}` (SDKs also send a bare list), oldest to newest;
  `tags` a dict of strings (SDKs also send a list of pairs); `breadcrumbs`
  `{"values": [...]}`; `logentry` `{message, params, formatted}`, built from a
  `message` string or `{message, params}` when that is all that came, and `message`
  its formatted text; `timestamp` ISO 8601 in UTC (None when absent or unreadable:
  the caller uses the arrival time); `event_id` 32 lowercase hex digits or "";
  `level` as sent ("error" when absent);
* bounded: messages 8,192 characters, tag keys 32 and values 200, 50 frames kept at
  each end of a longer stack (`frames_omitted: [start, end]`, as Sentry marks it),
  the newest 100 breadcrumbs; `_truncated: true` when anything was cut;
* cleaned by `telemetry.ingest.redaction.Scrubber` over the whole event: secrets
  redacted, NULs and lone surrogates removed, depth and key counts bounded.

Every field is attacker-controlled. Wrong types are dropped or coerced, never
raised on: a number where a string goes becomes its text, a list where a dict goes
is dropped.

`occurrence()` makes the stored event an error occurrence grouped by
`telemetry.sentry.grouping`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from runs.models import LEVEL_ALIASES
from telemetry.errors import MAX_STACK, Occurrence, page_path, visitor_key
from telemetry.ingest.redaction import MAX_KEYS, REDACTED, Scrubber
from telemetry.models import ErrorReport
from telemetry.sentry.grouping import frames_of, group, newest_exception

MAX_MESSAGE = 8_192
MAX_TAG_KEY = 32
MAX_TAG_VALUE = 200
FRAMES_KEPT = 50  # at each end of a longer stack, as Sentry does
MAX_BREADCRUMBS = 100  # the newest
MAX_EXCEPTIONS = 50  # the newest of a chain
MAX_CONTEXT_LINES = 20  # pre_context and post_context of a frame (SDKs send 5)
ELLIPSIS = "…"

# Short fields of the event and their bounds (release and environment: the columns).
EVENT_TEXT = {
    "release": 200,
    "environment": 64,
    "platform": 64,
    "logger": 200,
    "transaction": 200,
    "server_name": 200,
    "dist": 64,
    "type": 32,
}
FRAME_TEXT = {
    "filename": 1_024,
    "abs_path": 1_024,
    "module": 256,
    "function": 256,
    "package": 1_024,
    "platform": 64,
    "context_line": 1_000,
}
CRUMB_TEXT = {"type": 64, "category": 200, "level": 32, "message": 1_024}
EVENT_DICTS = ("user", "request", "contexts", "extra", "sdk")

_EVENT_ID = re.compile(r"^[0-9a-f]{32}$")
# Placeholders of a message template. Widths and precisions have at most two digits:
# `%999999999d` or `{:>999999999}` would make a gigabyte of spaces; longer ones stay
# literal text. Python's %-style also covers Node's util.format (`%s %d %i %f %j %o %O`).
_PERCENT = re.compile(
    r"%(?:\((?P<key>[^()]{0,64})\))?(?P<spec>[-#0 +]{0,4}\d{0,2}(?:\.\d{0,2})?)"
    r"(?P<conv>[diouxXeEfFgGcrsajO%])"
)
_BRACES = re.compile(
    r"\{\{|\}\}|\{(?P<field>[^{}!:]{0,64})(?:!(?P<conv>[rsa]))?(?::(?P<spec>[^{}]{0,32}))?\}"
)
_BIG_WIDTH = re.compile(r"\d{3}")


# --- The stored event -----------------------------------------------------------


def normalized(payload: Any) -> dict:
    """The canonical stored event of one Sentry event payload (see the module doc)."""
    # Two passes over the strings: the fields below are bounded and cleaned as they
    # are made canonical, then the whole event is walked once more, which redacts.
    # Redacting only in the walk halves the cost (the secret search is most of it).
    scrubber = Scrubber(redact=False)
    raw = payload if isinstance(payload, dict) else {}
    event: dict[str, Any] = {
        "event_id": _event_id(raw.get("event_id")),
        "timestamp": iso_timestamp(raw.get("timestamp")),
        "level": _text(scrubber, raw.get("level"), 32) or "error",
    }
    for key, limit in EVENT_TEXT.items():
        _put(event, key, _text(scrubber, raw.get(key), limit))
    logentry = _logentry(scrubber, raw)
    if logentry is not None:
        event["logentry"] = logentry
        event["message"] = logentry["formatted"]
    _put(event, "exception", _exceptions(scrubber, raw.get("exception")))
    _put(event, "threads", _threads(scrubber, raw.get("threads")))
    _put(event, "stacktrace", _stacktrace(scrubber, raw.get("stacktrace")))
    _put(event, "breadcrumbs", _breadcrumbs(scrubber, raw.get("breadcrumbs")))
    event["tags"] = _tags(scrubber, raw.get("tags"))
    for key in EVENT_DICTS:
        if isinstance(raw.get(key), dict):
            event[key] = raw[key]
    if "request" in event:
        event["request"] = _request(event["request"])
    _put(event, "fingerprint", _fingerprint(scrubber, raw.get("fingerprint")))
    handled = {*event, *EVENT_TEXT, "logentry", "message", "sentry.interfaces.Message"}
    handled |= {"exception", "threads", "stacktrace", "breadcrumbs", "fingerprint"}
    handled |= {*EVENT_DICTS, "_truncated"}
    # The rest is kept as sent, after the fields above: when the walk cuts an event
    # at MAX_KEYS keys, it cuts unknown ones, not these.
    for key, value in raw.items():
        if key not in handled:
            event[key] = value
    walker = Scrubber(redact=True)
    event = walker.walk(event)
    if scrubber.truncated or walker.truncated:
        event["_truncated"] = True
    return event


def iso_timestamp(value: Any) -> str | None:
    """RFC 3339 text or epoch seconds (also as text) as ISO 8601 in UTC; else None."""
    if isinstance(value, str):
        text = value.strip()[:64]
        try:
            value = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)  # Sentry reads a naive time as UTC
                return moment.astimezone(UTC).isoformat()
            except (ValueError, OverflowError):
                return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC).isoformat()
        except (ValueError, OverflowError, OSError):
            return None
    return None


def format_message(template: str, params: Any) -> str:
    """A message template with its parameters: %-style (Python logging, Node) or
    {}-style. Whatever they hold, this never raises; a placeholder without a
    parameter stays as it is."""
    if not params or not isinstance(params, list | dict):
        return template
    if any(match.group("conv") != "%" for match in _PERCENT.finditer(template)):
        pattern, render = _PERCENT, _percent
    elif "{" in template:
        pattern, render = _BRACES, _brace
    else:
        return template
    positional = iter(params if isinstance(params, list) else ())
    parts: list[str] = []
    size = last = 0
    try:
        for match in pattern.finditer(template):
            try:
                piece = render(match, params, positional)[:MAX_MESSAGE]
            except LookupError:
                piece = match.group(0)
            parts += [template[last : match.start()], piece]
            size += match.start() - last + len(piece)
            last = match.end()
            if size > MAX_MESSAGE:  # 4,000 `%s` of 30 KB parameters stay small
                return "".join(parts)[:MAX_MESSAGE]
    except Exception:  # a placeholder no renderer foresaw: the template, unformatted
        return template
    parts.append(template[last:])
    return "".join(parts)


def _next(positional) -> Any:
    for value in positional:
        return value
    raise LookupError("no parameter left")


def _percent(match: re.Match, params: list | dict, positional) -> str:
    conv = match.group("conv")
    if conv == "%":
        return "%"
    key = match.group("key")
    if key is not None:
        if not isinstance(params, dict):
            raise LookupError(key)
        value = params[key]
    else:
        value = _next(positional)
    if conv in "jOo":  # Node's JSON and inspect: a plain rendering is close enough
        return _plain(value)
    try:
        return ("%" + match.group("spec") + ("d" if conv == "i" else conv)) % (value,)
    except (TypeError, ValueError, OverflowError):  # "%d" of "abc": the value as text
        return _plain(value)


def _brace(match: re.Match, params: list | dict, positional) -> str:
    if match.group(0) in ("{{", "}}"):
        return match.group(0)[0]
    name = match.group("field")
    if name == "":
        value = _next(positional)
    elif name.isdigit() and isinstance(params, list):
        value = params[int(name)]
    elif isinstance(params, dict):
        value = params[name]  # attribute and index lookups ("a.b", "a[0]") stay literal
    else:
        raise LookupError(name)
    conv, spec = match.group("conv"), match.group("spec") or ""
    if conv:
        value = {"r": repr, "s": str, "a": ascii}[conv](value)
    if not spec or _BIG_WIDTH.search(spec):
        return _plain(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError, OverflowError):
        return _plain(value)


def _plain(value: Any) -> str:
    try:
        return value if isinstance(value, str) else str(value)
    except (ValueError, RecursionError):  # an integer past 4,300 digits, a deep list
        return ""


# --- Parts of the event ----------------------------------------------------------


def _put(event: dict, key: str, value: Any) -> None:
    if value is not None:
        event[key] = value


def _text(scrubber: Scrubber, value: Any, limit: int) -> str | None:
    """A string field: numbers and booleans become their text, anything else None."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int | float):
        value = _plain(value)
    elif not isinstance(value, str):
        return None
    return scrubber.text(value, limit)


def _int(value: Any) -> int | None:
    if isinstance(value, str) and value.isascii() and value.strip().isdigit() and len(value) < 12:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in ("true", "1", 1):
        return True
    if value in ("false", "0", 0):
        return False
    return None


def _event_id(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 36:
        return ""
    value = value.replace("-", "").lower()
    return value if _EVENT_ID.match(value) else ""


def _logentry(scrubber: Scrubber, raw: dict) -> dict | None:
    entry = raw.get("logentry", raw.get("sentry.interfaces.Message"))
    if isinstance(entry, str):
        entry = {"message": entry}
    if not isinstance(entry, dict):
        message = raw.get("message")
        if isinstance(message, dict):  # the old {message, params} form
            entry = message
        elif isinstance(message, str | int | float):
            entry = {"message": message}
        else:
            return None
    template = _text(scrubber, entry.get("message"), MAX_MESSAGE)
    formatted = _text(scrubber, entry.get("formatted"), MAX_MESSAGE)
    params = entry.get("params")
    params = scrubber.walk(params, 2) if isinstance(params, list | dict) and params else None
    if template is None and formatted is None:
        return None
    if formatted is None:
        formatted = scrubber.text(format_message(template, params), MAX_MESSAGE)
    return {"message": template or formatted, "params": params, "formatted": formatted}


def _exceptions(scrubber: Scrubber, raw: Any) -> dict | None:
    if isinstance(raw, dict):
        values = raw.get("values")
        if values is None and ("type" in raw or "value" in raw):
            values = [raw]  # one exception, not wrapped
    else:
        values = raw
    if not isinstance(values, list):
        return None
    if len(values) > MAX_EXCEPTIONS:
        scrubber.truncated = True
        values = values[-MAX_EXCEPTIONS:]
    kept = [exc for exc in map(lambda v: _exception(scrubber, v), values) if exc is not None]
    return {"values": kept} if kept else None


def _exception(scrubber: Scrubber, raw: Any) -> dict | None:
    if not isinstance(raw, dict):
        return None
    exc = dict(raw)
    for key, limit in (("type", 256), ("value", MAX_MESSAGE), ("module", 256)):
        _set(exc, key, _text(scrubber, exc.get(key), limit))
    if not isinstance(exc.get("mechanism"), dict):
        exc.pop("mechanism", None)
    for key in ("stacktrace", "raw_stacktrace"):
        _set(exc, key, _stacktrace(scrubber, exc.get(key)))
    if not (exc.get("type") or exc.get("value") or exc.get("stacktrace")):
        return None
    return exc


def _threads(scrubber: Scrubber, raw: Any) -> dict | None:
    values = raw.get("values") if isinstance(raw, dict) else raw
    if not isinstance(values, list):
        return None
    threads = []
    for thread in values[:MAX_KEYS]:
        if isinstance(thread, dict):
            thread = dict(thread)
            _set(thread, "stacktrace", _stacktrace(scrubber, thread.get("stacktrace")))
            threads.append(thread)
    return {"values": threads}


def _stacktrace(scrubber: Scrubber, raw: Any) -> dict | None:
    if isinstance(raw, list):
        raw = {"frames": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("frames"), list):
        return None
    stacktrace = dict(raw)
    frames = raw["frames"]
    omitted = raw.get("frames_omitted")
    if len(frames) > 2 * FRAMES_KEPT:
        scrubber.truncated = True
        omitted = [FRAMES_KEPT, len(frames) - FRAMES_KEPT]
        frames = frames[:FRAMES_KEPT] + frames[-FRAMES_KEPT:]
    elif not _span(omitted):
        omitted = None
    stacktrace["frames"] = [f for f in map(lambda f: _frame(scrubber, f), frames) if f is not None]
    _set(stacktrace, "frames_omitted", omitted)
    return stacktrace


def _frame(scrubber: Scrubber, raw: Any) -> dict | None:
    if not isinstance(raw, dict):
        return None
    frame = dict(raw)
    for key, limit in FRAME_TEXT.items():
        _set(frame, key, _text(scrubber, frame.get(key), limit))
    for key in ("lineno", "colno"):
        _set(frame, key, _int(frame.get(key)))
    _set(frame, "in_app", _bool(frame.get("in_app")))
    for key in ("pre_context", "post_context"):
        lines = frame.get(key)
        if isinstance(lines, list):
            lines = [_text(scrubber, line, 1_000) for line in lines[-MAX_CONTEXT_LINES:]]
            lines = [line for line in lines if line is not None]
        _set(frame, key, lines if isinstance(lines, list) else None)
    if not isinstance(frame.get("vars"), dict):
        frame.pop("vars", None)
    return frame


def _breadcrumbs(scrubber: Scrubber, raw: Any) -> dict | None:
    values = raw.get("values") if isinstance(raw, dict) else raw
    if not isinstance(values, list):
        return None
    if len(values) > MAX_BREADCRUMBS:
        scrubber.truncated = True
        values = values[-MAX_BREADCRUMBS:]  # SDKs send the oldest first
    crumbs = []
    for value in values:
        if not isinstance(value, dict):
            continue
        crumb = dict(value)
        # Browsers send epoch seconds, Python ISO text: one form for the page.
        _set(crumb, "timestamp", iso_timestamp(crumb.get("timestamp")))
        for key, limit in CRUMB_TEXT.items():
            _set(crumb, key, _text(scrubber, crumb.get(key), limit))
        if not isinstance(crumb.get("data"), dict):
            crumb.pop("data", None)
        crumbs.append(crumb)
    return {"values": crumbs}


def _tags(scrubber: Scrubber, raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = [p for p in raw if isinstance(p, list | tuple) and len(p) == 2]
    else:
        return {}
    tags: dict[str, str] = {}
    for key, value in pairs[:MAX_KEYS]:
        key = _text(scrubber, key, MAX_TAG_KEY)
        value = _text(scrubber, value, MAX_TAG_VALUE)
        if key and value is not None:
            tags[key] = value
    if len(pairs) > MAX_KEYS:
        scrubber.truncated = True
    return tags


def _request(request: dict) -> dict:
    request = dict(request)
    headers = request.get("headers")
    if isinstance(headers, list):  # Sentry also accepts [[name, value], …]
        headers = {
            str(pair[0]): pair[1]
            for pair in headers
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        }
    if not isinstance(headers, dict):
        request.pop("headers", None)
    else:
        request["headers"] = headers
    # The walk redacts `Cookie` headers by name; the parsed `cookies` field holds the same.
    if request.get("cookies") not in (None, "", [], {}):
        request["cookies"] = REDACTED
    return request


def _fingerprint(scrubber: Scrubber, raw: Any) -> list[str] | None:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return None
    entries = [_text(scrubber, entry, 200) for entry in raw[:32]]
    entries = [entry for entry in entries if entry is not None]
    return entries or None


def _span(value: Any) -> bool:
    """Whether a `frames_omitted` is [start, end] of two indices."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    )


def _set(target: dict, key: str, value: Any) -> None:
    """Set a field, or drop it when its value was unusable."""
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value


# --- As an error occurrence --------------------------------------------------------


def occurrence(
    event: dict,
    *,
    received_at: datetime,
    request_id: str = "",
    run_id: int | None = None,
    client_address: str = "",
) -> Occurrence:
    """A normalized event as an error occurrence, grouped by Sentry's rules.

    `client_address` stands in for a user's `ip_address` of `{{auto}}` (what browser
    SDKs send: "the address this came from").
    """
    grouping = group(event)
    exception = newest_exception(event)
    error = ""
    if exception is not None:
        kind, value = _str(exception.get("type")), _str(exception.get("value"))
        error = f"{kind}: {value}" if kind and value else kind or value
    message = _str(event.get("message"))
    if not message and exception is not None:
        message = _str(exception.get("value"))
    level = _str(event.get("level")).lower()
    user = _dict(event.get("user"))
    request = _dict(event.get("request"))
    raw_url = _str(request.get("url"))
    sdk = _dict(event.get("sdk"))
    summary_user = {
        key: user[key]
        for key in ("id", "username", "email", "ip_address")
        if user.get(key) not in (None, "")
    }
    context = {
        "platform": _str(event.get("platform")),
        "logger": _str(event.get("logger")),
        "transaction": _str(event.get("transaction")),
        "sdk": f"{_str(sdk.get('name'))} {_str(sdk.get('version'))}".strip(),
        "tags": _dict(event.get("tags")),
        "user": summary_user,
        "url": raw_url.split("?", 1)[0].split("#", 1)[0][:500],
    }
    return Occurrence(
        source=ErrorReport.Source.SENTRY,
        level=LEVEL_ALIASES.get(level, "error"),
        message=message,
        error=error[:MAX_MESSAGE],
        stack=traceback_text(event),
        context=context,
        url=page_path(raw_url),
        visitor=_visitor(user, request, client_address),
        request_id=request_id,
        run_id=run_id,
        received_at=received_at,
        group_key=grouping.key,
        given_title=grouping.title,
        given_culprit=grouping.culprit,
        event_id=_str(event.get("event_id"))[:32],
        release=_str(event.get("release"))[:200],
        environment=_str(event.get("environment"))[:64],
        event=event,
    )


def traceback_text(event: dict) -> str:
    """The newest exception as a Python-style traceback, oldest call first; for a
    message sent with a stack trace (`attach_stacktrace`), that stack."""
    exception = newest_exception(event)
    if exception is not None:
        frames = frames_of(exception)
        stacktrace = _dict(exception.get("stacktrace"))
        kind, value = _str(exception.get("type")), _str(exception.get("value"))
        last = f"{kind}: {value}" if kind and value else kind or value
    else:
        stacktrace = _dict(event.get("stacktrace"))
        frames = frames_of({"stacktrace": stacktrace})
        last = ""
    if not frames:
        return ""
    omitted = stacktrace.get("frames_omitted")
    lines = ["Traceback (most recent call last):"]
    for i, frame in enumerate(frames):
        if _span(omitted) and i == omitted[0]:
            cut = omitted[1] - omitted[0]
            lines.append(f"  {ELLIPSIS} {cut} frames omitted {ELLIPSIS}")
        file = (
            _str(frame.get("abs_path"))
            or _str(frame.get("filename"))
            or _str(frame.get("module"))
            or "?"
        )
        line = frame.get("lineno")
        where = f", line {line}" if isinstance(line, int) else ""
        lines.append(f'  File "{file}"{where}, in {_str(frame.get("function")) or "?"}')
        code = _str(frame.get("context_line")).strip()
        if code:
            lines.append(f"    {code}")
    if last:
        lines.append(last)
    text = "\n".join(lines)
    return text if len(text) <= MAX_STACK else text[: MAX_STACK - 1] + ELLIPSIS


def _visitor(user: dict, request: dict, client_address: str) -> str:
    """Sentry counts users by id, username, email, then address."""
    known = [user[k] for k in ("id", "username", "email") if user.get(k) not in (None, "")]
    ident = known[0] if known else None
    address = _str(user.get("ip_address"))
    if address == "{{auto}}":
        address = client_address
    if ident is None and not address:
        return ""  # nothing tells visitors apart: not one anonymous "user" for all
    headers = _dict(request.get("headers"))
    agent = next((_str(v) for k, v in headers.items() if k.lower() == "user-agent"), "")
    return visitor_key(_plain(ident) if ident is not None else None, address, agent[:500])


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
