"""Run events as agents send them: the Gitoma record, judged line by line.

A body is NDJSON (or one JSON array) of records `{ts, slug, phase, level, event,
data}` plus optional fields. The request judges every line to answer how many were
accepted (`judge_body`); the worker reads the spooled body again with the same
judge (`parse_body`), so a line the request accepted is exactly a line the worker
stores. Lines of the usual shape take a shortcut to the same verdict (`_fast_record`,
msgspec in C), their data kept as the JSON it came in until something reads it; the
rest go through orjson and `normalize`, which words every error.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec
import orjson

from portal.db import safe_text
from portal.http import BodyError
from runs.models import LEVEL_ALIASES, Run, run_id_problem
from runs.timestamps import TimestampError, parse_timestamp
from telemetry.ingest.redaction import (
    BODY_WALK_HINT,
    ELLIPSIS,
    MAX_DEPTH,
    MAX_MESSAGE,
    MAX_STRING,
    REDACT_HINT,
    WALK_HINT,
    Scrubber,
)


class LineError(ValueError):
    """One line is refused; the message names the field."""


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _lenient_loads(raw)


def _lenient_loads(raw: bytes) -> Any:
    # orjson refuses invalid UTF-8 and lone surrogates; the stdlib parser on
    # a replaced decode accepts both, and scrubbing cleans what is left.
    return json.loads(raw.decode("utf-8", "replace"))


def _opt_str(obj: dict, key: str, limit: int) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise LineError(f"{key}: must be a string")
    if len(value) > limit:
        raise LineError(f"{key}: longer than {limit} characters")
    return value


def _opt_int(obj: dict, key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError(f"{key}: must be an integer")
    if not 0 <= value < 2**63:
        raise LineError(f"{key}: out of range")
    return value


class Record(msgspec.Struct, gc=False):
    """One judged record. A msgspec Struct: built 5,000 times a batch, five times
    cheaper than a dataclass. Not tracked by the collector: nothing it holds
    refers back to it.
    """

    ts: datetime
    event: str
    level: str
    slug: str
    phase: str
    # The data object, or None while it is kept as the JSON it came in (`data_json`):
    # most records are stored without their data ever being read. Read it with
    # `fields()`, which parses it on first use.
    data: dict | None
    run_id: str
    seq: int | None
    message: str
    pid: int | None
    host: str
    request_id: str
    trace_id: str
    span_id: str
    truncated: bool = False
    # Parsed by the lenient stdlib fallback: may hold lone surrogates, huge
    # integers or infinities, so scrub always walks it.
    lenient: bool = False
    # Whether scrub must walk the record, when the worker already knows it from a
    # scan of the whole body (None: scrub searches the raw line itself).
    walk: bool | None = None
    data_json: bytes | None = None
    # The timestamp as the client wrote it, when it was a string (see copy_rows).
    ts_text: str | None = None
    run: Run | None = None
    # What the portal priced an `llm.call` at, when the agent sent no cost: stored
    # beside the agent's data (Event.cost_usd), never inside it.
    cost_usd: Decimal | None = None

    def fields(self, read_only: bool = False) -> dict:
        """The data object, parsed from `data_json` on first use.

        `data_json` is what COPY writes while it is set: a caller that may change
        the object drops it (the default); `read_only` keeps it, so data that is
        only read is not written out again.
        """
        data = self.data
        if data is None:
            try:
                data = orjson.loads(self.data_json)
            except orjson.JSONDecodeError:
                # Not expected: the worker reads every line its body scan flags (huge
                # numbers, escapes) the slow way. Should one get here, it is read and
                # cleaned as the slow path would.
                scrubber = Scrubber(redact=True)
                data = scrubber.walk(_lenient_loads(self.data_json), 0)
                if scrubber.truncated:
                    data["_truncated"] = True
                read_only = False
            self.data = data
        if not read_only:
            self.data_json = None
        return data


def normalize(obj: Any, default_run_id: str = "") -> Record:
    """Judge one record against the Gitoma schema (plus our optional fields).

    Runs twice per record (request and worker), so the common case of each field
    is tested inline; anything unusual goes through _opt_str/_opt_int, which
    convert or raise. Fields are judged in a fixed order: the first error wins.
    """
    if not isinstance(obj, dict):
        raise LineError("record must be a JSON object")
    get = obj.get
    event = get("event")
    if not isinstance(event, str) or not (stripped := event.strip()):
        raise LineError("event: required non-empty string")
    if len(event) > 200:
        raise LineError("event: longer than 200 characters")
    level_raw = get("level") or "info"
    if isinstance(level_raw, str):
        level = LEVEL_ALIASES.get(level_raw) or LEVEL_ALIASES.get(level_raw.lower())
    else:
        level = None
    if level is None:
        raise LineError("level: must be one of debug, info, warn, error")
    data = get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise LineError("data: must be a JSON object")
    message = get("message")
    if message is None:
        message = ""
    elif not isinstance(message, str):
        raise LineError("message: must be a string")
    run_id = get("run_id")
    if type(run_id) is not str or len(run_id) > 128:
        run_id = _opt_str(obj, "run_id", 128)
    try:
        ts = parse_timestamp(get("ts"))
    except TimestampError as exc:
        raise LineError(str(exc)) from None
    slug = get("slug")
    if type(slug) is not str or len(slug) > 200:
        slug = _opt_str(obj, "slug", 200)
    phase = get("phase")
    if type(phase) is not str or len(phase) > 64:
        phase = _opt_str(obj, "phase", 64)
    seq = get("seq")
    if seq is not None:
        seq = _opt_int(obj, "seq")
    # The rarely sent fields: one lookup each when absent.
    pid = None if get("pid") is None else _opt_int(obj, "pid")
    host = "" if get("host") is None else _opt_str(obj, "host", 255)
    request_id = "" if get("request_id") is None else _opt_str(obj, "request_id", 128)
    trace_id = "" if get("trace_id") is None else _opt_str(obj, "trace_id", 64)
    span_id = "" if get("span_id") is None else _opt_str(obj, "span_id", 32)
    run_id = run_id or default_run_id
    if run_id and (problem := run_id_problem(run_id)):
        raise LineError(f"run_id: {problem}")
    # Positional, in field order: msgspec matches keywords one by one, 0.7 µs a
    # record here, where every line of every request is built (docs/performance.md).
    return Record(
        ts,
        stripped,
        level,
        slug,
        phase,
        data,
        run_id,
        seq,
        message,
        pid,
        host,
        request_id,
        trace_id,
        span_id,
    )


def _text(limit: int) -> Any:
    return Annotated[str, msgspec.Meta(max_length=limit)] | None


_UINT63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None


class _Line(msgspec.Struct, gc=False):
    """The common shape of a record, decoded and mostly judged by msgspec in C.

    Only a shortcut: a line it cannot read (any other type, a bound passed, a
    lone surrogate, …) goes through orjson and `normalize`, which judge every
    case and word the errors, so verdicts and records do not depend on it.
    `data` is kept raw: the request only needs to know it is an object.
    """

    event: Annotated[str, msgspec.Meta(max_length=200)]
    ts: str | int | float | None = None
    level: str | None = None
    slug: _text(200) = None
    phase: _text(64) = None
    data: msgspec.Raw = msgspec.Raw(b"null")
    message: str | None = None
    run_id: _text(128) = None
    seq: _UINT63 = None
    pid: _UINT63 = None
    host: _text(255) = None
    request_id: _text(128) = None
    trace_id: _text(64) = None
    span_id: _text(32) = None


_decode_line = msgspec.json.Decoder(_Line).decode


def _fast_record(line: bytes, default_run_id: str) -> Record | None:
    """The Record `normalize(orjson.loads(line))` makes, or None to take that path.

    None whenever the answer could differ: msgspec refuses the line, or a check
    fails (the slow path then words the error). The data object is kept as JSON.
    """
    try:
        s = _decode_line(line)
    except (msgspec.MsgspecError, RecursionError):
        return None
    stripped = s.event.strip()
    level_raw = s.level or "info"
    level = LEVEL_ALIASES.get(level_raw) or LEVEL_ALIASES.get(level_raw.lower())
    if not stripped or level is None:
        return None
    data_json: bytes | None = bytes(s.data)
    if data_json[:1] == b"{":
        data = None
    elif data_json == b"null":
        data, data_json = {}, None
    else:
        return None
    value = s.ts
    ts_text = None
    try:
        if type(value) is str:
            ts_text = value
            ts = _fromisoformat(value)  # the usual case, inline; anything else below
            if ts.tzinfo is not UTC or not 1970 <= ts.year <= 9999:
                ts = parse_timestamp(value)
        else:
            ts = parse_timestamp(value)
    except ValueError:  # LineError included: the slow path words the error
        return None
    run_id = s.run_id
    if not run_id:
        run_id = default_run_id  # judged with the request (run_id query parameter)
    elif "/" in run_id or run_id in (".", ".."):
        return None  # refused: the slow path words why
    # Positional, in field order (see normalize): the hot constructor of the path.
    return Record(
        ts,
        stripped,
        level,
        s.slug or "",
        s.phase or "",
        data,
        run_id,
        s.seq,
        s.message or "",
        s.pid,
        s.host or "",
        s.request_id or "",
        s.trace_id or "",
        s.span_id or "",
        False,  # truncated
        False,  # lenient
        None,  # walk
        data_json,
        ts_text,
    )


_fromisoformat = datetime.fromisoformat


def _array_items(body: bytes) -> list:
    """The records of a body that is one JSON array, or the request's 400."""
    try:
        items = _loads(body)
    except (ValueError, RecursionError) as exc:
        raise BodyError(400, f"body is not a valid JSON array: {exc}") from None
    if not isinstance(items, list):
        raise BodyError(400, "body is not a valid JSON array")
    return items


def judge_body(
    body: bytes, default_run_id: str = "", max_line: int = 1 << 20, max_errors: int = 100
) -> tuple[int, int, list[dict]]:
    """The request's verdict on a body: (accepted, rejected, errors), as parse_body
    judges it. Records are counted and dropped one by one, never kept: 5,000 of them
    alive at once cost the request more in fresh memory than judging them.
    """
    counted, rejected, errors = _read_lines(body, default_run_id, max_line, max_errors, None)
    return counted, rejected, errors


def parse_body(
    body: bytes, default_run_id: str = "", max_line: int = 1 << 20, max_errors: int = 100
) -> tuple[list[tuple[bytes | None, Record]], int, list[dict]]:
    """Judge every line. Returns (good records with their raw line, rejected count, errors).

    The body is NDJSON, or one JSON array (its items have no raw line).
    """
    good: list[tuple[bytes | None, Record]] = []
    _, rejected, errors = _read_lines(body, default_run_id, max_line, max_errors, good)
    return good, rejected, errors


def _read_lines(
    body: bytes,
    default_run_id: str,
    max_line: int,
    max_errors: int,
    good: list[tuple[bytes | None, Record]] | None,
) -> tuple[int, int, list[dict]]:
    """Judge every line; keep the good ones in `good`, or only count them (None).

    This loop runs for every record twice (request and worker), hence its plain
    shape. Lines of the common shape are read by msgspec (`_fast_record`), the
    rest by orjson and `normalize`. When keeping (the worker), one search of the
    whole body first finds the lines scrub must walk (`BODY_WALK_HINT`): those
    are read the slow way, data parsed, exactly as before the shortcut existed.
    """
    scan = good is not None
    counted = 0
    append = good.append if good is not None else None
    errors: list[dict] = []
    rejected = 0

    def reject(number: int, exc: Exception) -> None:
        nonlocal rejected
        rejected += 1
        if len(errors) < max_errors:
            message = str(exc) if isinstance(exc, LineError) else f"invalid JSON: {exc}"
            errors.append({"line": number, "error": message[:300]})

    if body.lstrip()[:1] == b"[":
        for number, item in enumerate(_array_items(body.lstrip()), 1):
            try:
                record = normalize(item, default_run_id)
            except (LineError, ValueError, RecursionError) as exc:
                reject(number, exc)
                continue
            counted += 1
            if append is not None:
                append((None, record))
        return counted, rejected, errors

    fast = True
    hints = [len(body)]  # match offsets, then a sentinel no line starts after
    if scan:
        hints[:0] = [m.start() for m in BODY_WALK_HINT.finditer(body)]
        # msgspec skips unknown keys without checking their UTF-8; a body that is
        # not valid UTF-8 (rare) is read the slow way throughout, leniently where
        # orjson refuses a line, as the request read it.
        try:
            body.decode()
        except UnicodeDecodeError:
            fast = False
    next_hint, hint_index = hints[0], 0
    end = -1  # offset of the newline that ends the current line
    for number, line in enumerate(body.split(b"\n"), 1):
        size = len(line)
        slow = not fast
        if scan:
            start = end + 1
            end = start + size
            if next_hint < end:  # the body scan found something in this line
                slow = True
                while next_hint < end:
                    hint_index += 1
                    next_hint = hints[hint_index]
        try:
            if size > max_line:
                raise LineError(f"line longer than {max_line} bytes")
            line = line.strip()
            if not line:
                continue
            if not slow and size > 512:
                # Long lines: scrub walks them. Deep ones (the scan finds those with
                # more than MAX_DEPTH brackets): the parsers' recursion limits
                # differ, so the verdict on them is the slow path's.
                slow = len(line) > MAX_STRING or (
                    not scan and line.count(b"{") + line.count(b"[") > 256
                )
            record = None if slow else _fast_record(line, default_run_id)
            if record is None:
                try:
                    record = normalize(orjson.loads(line), default_run_id)
                except orjson.JSONDecodeError:
                    record = normalize(_lenient_loads(line), default_run_id)
                    record.lenient = True
            elif scan:
                record.walk = False  # the scan found nothing, and it is short and shallow
            counted += 1
            if append is not None:
                append((line, record))
        except (LineError, ValueError, RecursionError) as exc:
            reject(number, exc)
    return counted, rejected, errors


def _identifiers(record: Record) -> tuple[str, str, str, str, str]:
    return record.run_id, record.host, record.request_id, record.trace_id, record.span_id


def scrub(raw: bytes | None, record: Record) -> None:
    """Make a record safe for PostgreSQL and free of secrets, walking only when needed.

    The walk is the expensive part; a search of the raw line decides whether it
    can matter (or the worker's scan of the whole body did: `record.walk`). Huge
    integers, lone surrogates and infinities only come from the lenient parser,
    so its records are always walked, and redacted to be safe.
    """
    if raw is None and not record.lenient:  # from a JSON array or OTLP: no raw line
        try:
            raw = orjson.dumps(
                {"d": record.fields(), "m": record.message, "i": _identifiers(record)},
                default=str,
            )
        except TypeError:  # lone surrogates or an integer orjson cannot write
            raw = None
    if raw is None or record.lenient:
        walk = redact = True
    else:
        walk = record.walk
        if walk is None:
            walk = (
                WALK_HINT.search(raw.lower()) is not None
                or len(raw) > MAX_STRING
                or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
            )
        redact = walk and REDACT_HINT.search(raw.lower()) is not None
    if walk:
        scrubber = Scrubber(redact)
        record.data = scrubber.walk(record.fields(), 0)
        record.message = scrubber.text(record.message, MAX_MESSAGE)
        record.slug = scrubber.text(record.slug, 200)
        record.phase = scrubber.text(record.phase, 64)
        record.event = scrubber.text(record.event, 200)
        # Identifiers are cleaned, never redacted: a run id must stay the run's id.
        record.run_id, record.host, record.request_id, record.trace_id, record.span_id = (
            safe_text(value) for value in _identifiers(record)
        )
        record.truncated = scrubber.truncated
    elif len(record.message) > MAX_MESSAGE:
        record.message = record.message[: MAX_MESSAGE - 1] + ELLIPSIS
        record.truncated = True
    if record.truncated:
        record.fields()["_truncated"] = True
