"""Run-event ingestion: from a request body to rows in `runs_event`.

Two halves share one judge (`normalize`), so a line the request counted as
accepted is exactly a line the worker stores:

* the request (`read_body`, `judge_body`) decompresses within limits and judges
  each line, then the raw body is spooled as an IngestBatch;
* the worker (`process_batch`) parses the spooled body again (`parse_body`),
  scrubs secrets and unsafe characters, resolves runs, assigns `seq`, and writes
  events with one `COPY` in the same transaction that marks the batch done.

Lines of the usual shape take a shortcut to the same verdict and record
(`_fast_record`, msgspec), their data kept as the JSON it came in until
something reads it. Expensive walks over the data (redaction, NUL/surrogate
cleaning, depth and length bounds) run only when a scan of the body (the worker)
or of the raw line says they may matter. docs/performance.md tells the costs.
"""

from __future__ import annotations

import gc
import json
import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Annotated, Any

import msgspec
import orjson
import re2
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.module_loading import import_string
from isal import isal_zlib

from runs.ids import uuid7
from runs.models import TERMINAL_PHASES, ModelPrice, PriceBook, Project, Run

LEVELS = {
    "debug": "debug",
    "trace": "debug",
    "info": "info",
    "notice": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "err": "error",
    "fatal": "error",
    "critical": "error",
}
MAX_DEPTH = 32
MAX_STRING = 32_768
MAX_MESSAGE = 8_192
MAX_KEYS = 512
ELLIPSIS = "…"
REDACTED = "[redacted]"
MAX_ATTEMPTS = 5

# Keys whose values are secrets. Matched on the whole key or its last `_`/`-`
# part, so `github_token` and `api_key` are caught but `tokens_in` is not.
_SECRET_KEY = re.compile(
    r"^(?:.*[_\-.])?(?:password|passwd|pwd|secret|secret_key|client_secret|token|"
    r"access_token|refresh_token|auth_token|api_key|apikey|private_key|credentials?|"
    r"authorization|cookie|set_cookie)$",
    re.IGNORECASE,
)
# Cheap tests on the raw line, lowered once (a (?i) pattern is several times
# slower). Every key _SECRET_KEY matches ends in one of these words, and a JSON
# key is followed by its closing quote, hence `token"` (a bare `_token` would flag
# every `prompt_tokens` of an LLM call). The value hints cover what _SECRET_VALUE
# matches, also with JSON-escaped slashes (`https:\/\/user:pw@`).
_REDACT_HINT = re.compile(
    rb'passw|pwd|secret|token"|api_?key|private_key|credential|authorization|cookie'
    rb'|bearer|basic|:\\?/\\?/[^/\s"]*@|gh[pousr]_|sk-'
    # An ASCII character written as a JSON escape (`pass\u0077ord`) hides a key or
    # value from the tests above: such a line is redacted after decoding.
    rb"|\\u00[2-7]"
)
# What decides whether a line is walked at all: _REDACT_HINT plus what needs
# cleaning (NUL, lone surrogates, U+FFFD), run on a line when no scan of its body
# decided already (the lines the worker's scan sent the slow way). It matches the
# same lines, written for speed: Python's re tries the whole alternation at each
# byte that can start a branch, so each branch starts at its rarest byte (w, k,
# z, /, …) and checks what comes before with a lookbehind. 2.4x faster.
_WALK_HINT = re.compile(
    rb"w(?:(?<=passw)|(?<=pw)d)"
    rb'|k(?:(?<=tok)en"|(?<=api_k)ey|(?<=apik)ey|(?<=private_k)ey|(?<=cook)ie|(?<=sk)-)'
    rb"|z(?<=authoriz)ation"
    rb"|cr(?:(?<=secr)et|edential)"
    rb"|b(?:earer|asic)"
    rb"|gh[pousr]_"
    rb'|/(?:(?<=:/)|(?<=:\\/))\\?/[^/\s"]*@'
    rb"|\\u(?:0000|d|00[2-7])|\xef\xbf\xbd"
)
# The lines _WALK_HINT matches, and a few more, found by RE2 in a whole body at
# once: the worker scans each spooled body in one pass (~1 µs a line; Python's re
# took ~4 µs per line) and reads the lines it finds the slow way, as before.
# Latin-1 so that byte escapes match bytes, not UTF-8 code points.
_RE2_LATIN1 = re2.Options()
_RE2_LATIN1.encoding = re2.Options.Encoding.LATIN1
_BODY_WALK_HINT = re2.compile(
    # Case-insensitive rather than a search of body.lower(): no 2 MB copy. RE2 also
    # folds Latin-1 letters, so it may find a little more, never less.
    rb'(?i)passw|pwd|secret|token"|api_?key|private_key|credential|authorization|cookie'
    rb'|bearer|basic|:\\?/\\?/[^/\t\n\x0b\x0c\r "]*@|gh[pousr]_|sk-'
    rb"|\\u(?:0000|d|00[2-7])|\xef\xbf\xbd"
    # Numbers orjson refuses (beyond 64 bits, beyond a double), which the lenient
    # parser reads: a line holding one is read the slow way, as before.
    rb"|[:,\[ \t\r]-?[0-9]+(?:\.[0-9]+)?(?:[0-9]{18}|e[+\-]?[0-9]{3})"
    # More brackets than MAX_DEPTH in a line: it may nest too deep (counted here in
    # the same pass rather than by two bytes.count a line).
    + rb"|(?:[^\n{\[]*[{\[]){%d}"
    % (MAX_DEPTH + 1),
    _RE2_LATIN1,
)
_SECRET_VALUE = re.compile(
    r"(?i)(?P<scheme>\bbearer\s+|\bbasic\s+)[A-Za-z0-9._~+/=\-]+"
    # Scheme anchored at a word start and bounded: unbounded, a long run of
    # letters made the search quadratic (64 KB took ~30 s).
    r"|(?P<url>\b[a-z][a-z0-9+.\-]{0,31}://)[^/\s\"'@]{1,256}@"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bsk-[A-Za-z0-9_\-]{20,}"
)


class IngestError(Exception):
    """A whole request is refused: status code and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class LineError(ValueError):
    pass


# --- Request side -----------------------------------------------------------


def read_body(stream, encoding: str, limit: int, raw: list[bytes] | None = None) -> bytes:
    """Read and decompress a request body, refusing it as soon as it passes `limit`.

    The limit applies to the decompressed size and is enforced while streaming,
    so a small gzip bomb is cut off after `limit` bytes of output, not after
    inflating it in memory. The bytes as received are appended to `raw` if given.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        decompressor = None
    elif encoding in ("gzip", "x-gzip"):
        # ISA-L inflates gzip ~3x faster than zlib, with zlib's interface.
        decompressor = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
    else:
        raise IngestError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or deflate")

    gzipped = encoding in ("gzip", "x-gzip")
    out = bytearray()
    raw_seen = 0
    while True:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        raw_seen += len(chunk)
        if raw_seen > limit + 65536:
            raise IngestError(413, f"body larger than {limit} bytes")
        if raw is not None:
            raw.append(chunk)
        if decompressor is None:
            out += chunk
        else:
            try:
                data = chunk
                while data:
                    out += decompressor.decompress(data, limit + 1 - len(out))
                    if len(out) > limit:
                        break
                    data = decompressor.unconsumed_tail
                    if not data and decompressor.eof and decompressor.unused_data and gzipped:
                        # Several gzip members one after the other (`cat a.gz b.gz`, a
                        # shipper appending): each is read, as gunzip reads them.
                        data = decompressor.unused_data
                        decompressor = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
            except (zlib.error, isal_zlib.error):
                if encoding == "deflate" and raw_seen == len(chunk) and not out:
                    # Some clients send raw deflate without the zlib header.
                    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
                    try:
                        out += decompressor.decompress(chunk, limit + 1)
                    except zlib.error:
                        raise IngestError(400, "body is not valid deflate data") from None
                else:
                    raise IngestError(400, f"body is not valid {encoding} data") from None
        if len(out) > limit:
            raise IngestError(413, f"body larger than {limit} bytes after decompression")
    if decompressor is not None and not decompressor.eof and out:
        raise IngestError(400, f"body is truncated {encoding} data")
    return bytes(out)


def spool_body(body: bytes, encoding: str, raw: list[bytes]) -> bytes:
    """What IngestBatch.body keeps of a judged body: compressed, as cheaply as possible.

    A gzip body is kept as it came (`raw`, whose first member decompresses to
    `body`, as read_body read it): compressing megabytes again would cost the
    request more than judging them. Anything else is zlib-compressed.
    """
    if encoding.strip().lower() in ("gzip", "x-gzip"):
        return b"".join(raw)
    return zlib.compress(body, 1)


def unspool_body(data: bytes) -> bytes:
    """The body spool_body kept: zlib's auto-detection reads both zlib and gzip, and
    every member of a multi-member gzip body, as read_body did.
    """
    parts = []
    while data:
        # ISA-L inflates ~3x faster than zlib; the body was checked by the request.
        decompressor = isal_zlib.decompressobj(32 + zlib.MAX_WBITS)
        parts.append(decompressor.decompress(data))
        data = decompressor.unused_data
    return b"".join(parts)


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is parsed and stored.

    A batch allocates several containers per record and keeps them all alive, so
    the collector runs every 700 allocations and walks the ever larger young heap
    for nothing (parsed JSON has no cycles): it doubled the cost of parsing a
    5,000-line batch. Memory is still freed by reference counting; cycles made
    meanwhile wait for the next collection. Counted, so that one of several
    request threads finishing does not re-enable it under the others.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _lenient_loads(raw)


def _lenient_loads(raw: bytes) -> Any:
    # orjson refuses invalid UTF-8 and lone surrogates; the stdlib parser on
    # a replaced decode accepts both, and scrubbing cleans what is left.
    return json.loads(raw.decode("utf-8", "replace"))


def _parse_ts(value: Any) -> datetime:
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
                raise LineError("ts: not an ISO 8601 timestamp") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if value > 100_000_000_000 else value
        try:
            ts = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise LineError("ts: epoch value out of range") from None
    elif value is None:
        raise LineError("ts: required")
    else:
        raise LineError("ts: must be an ISO 8601 string or epoch seconds")
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    elif ts.tzinfo is not UTC:
        # In UTC: PostgreSQL refuses offsets beyond ±15:59, which Python reads (up
        # to ±23:59), and one refused row would fail the whole batch's COPY.
        try:
            ts = ts.astimezone(UTC)
        except OverflowError:
            raise LineError("ts: year out of range") from None
    if not 1970 <= ts.year <= 9999:
        raise LineError("ts: year out of range")
    return ts


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
                scrubber = _Scrubber(redact=True)
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
        level = LEVELS.get(level_raw) or LEVELS.get(level_raw.lower())
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
    ts = _parse_ts(get("ts"))
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
    return Record(
        ts,
        stripped,
        level,
        slug,
        phase,
        data,
        run_id or default_run_id,
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
    level = LEVELS.get(level_raw) or LEVELS.get(level_raw.lower())
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
                ts = _parse_ts(value)
        else:
            ts = _parse_ts(value)
    except ValueError:  # LineError included: the slow path words the error
        return None
    return Record(
        ts,
        stripped,
        level,
        s.slug or "",
        s.phase or "",
        data,
        s.run_id or default_run_id,
        s.seq,
        s.message or "",
        s.pid,
        s.host or "",
        s.request_id or "",
        s.trace_id or "",
        s.span_id or "",
        False,
        False,
        None,
        data_json,
        ts_text,
    )


_fromisoformat = datetime.fromisoformat


def _array_items(body: bytes) -> list:
    """The records of a body that is one JSON array, or the request's 400."""
    try:
        items = _loads(body)
    except (ValueError, RecursionError) as exc:
        raise IngestError(400, f"body is not a valid JSON array: {exc}") from None
    if not isinstance(items, list):
        raise IngestError(400, "body is not a valid JSON array")
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
    whole body first finds the lines scrub must walk (`_BODY_WALK_HINT`): those
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
        hints[:0] = [m.start() for m in _BODY_WALK_HINT.finditer(body)]
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


# --- Worker side: scrubbing -------------------------------------------------


class _Scrubber:
    """Cleans one record's data in place: secrets, NULs, surrogates, size bounds."""

    def __init__(self, redact: bool):
        self.redact = redact
        self.truncated = False

    def text(self, value: str, limit: int = MAX_STRING) -> str:
        if "\x00" in value:
            value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates: PostgreSQL refuses them; show U+FFFD instead.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if len(value) > limit:  # cut first: redaction then scans at most `limit`
            self.truncated = True
            value = value[: limit - 1] + ELLIPSIS
        if self.redact:
            value = _SECRET_VALUE.sub(_redact_match, value)
        return value

    def walk(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                self.truncated = True
                return "[too deep]"
            out = {}
            for i, (key, item) in enumerate(value.items()):
                if i >= MAX_KEYS:
                    self.truncated = True
                    break
                key = self.text(str(key), 200)
                if self.redact and _SECRET_KEY.match(key) and item not in (None, "", [], {}):
                    out[key] = REDACTED
                else:
                    out[key] = self.walk(item, depth + 1)
            return out
        if isinstance(value, list):
            if depth >= MAX_DEPTH:
                self.truncated = True
                return "[too deep]"
            if len(value) > MAX_KEYS:
                self.truncated = True
                value = value[:MAX_KEYS]
            return [self.walk(item, depth + 1) for item in value]
        if isinstance(value, float) and value != value:  # NaN is not JSON
            return None
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            # The stdlib parser keeps huge integers exact; orjson cannot write them.
            self.truncated = True
            return str(value)[:64] + ELLIPSIS
        return value


def _redact_match(match: re.Match) -> str:
    if match.group("scheme"):
        return match.group("scheme") + REDACTED
    if match.group("url"):
        return match.group("url") + REDACTED + "@"
    return REDACTED


def _identifiers(record: Record) -> tuple[str, str, str, str, str]:
    return record.run_id, record.host, record.request_id, record.trace_id, record.span_id


def safe_text(value: str) -> str:
    """`value` as PostgreSQL text accepts it: NUL removed, lone surrogates replaced."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


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
                _WALK_HINT.search(raw.lower()) is not None
                or len(raw) > MAX_STRING
                or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
            )
        redact = walk and _REDACT_HINT.search(raw.lower()) is not None
    if walk:
        scrubber = _Scrubber(redact)
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


# --- Worker side: runs and lifecycle ----------------------------------------


_TOKENS_IN = ("tokens_in", "input_tokens", "prompt_tokens")
_TOKENS_OUT = ("tokens_out", "output_tokens", "completion_tokens")


def _first_int(data: dict, usage: dict, keys: tuple[str, str, str]) -> int:
    """The first count found under `keys`, in `data` then in `usage` (runs per LLM call)."""
    a, b, c = keys
    for value in (data.get(a), data.get(b), data.get(c), usage.get(a), usage.get(b), usage.get(c)):
        # type() is: bool (an int subclass) is not a count.
        if type(value) is int and value >= 0:
            return value if value < _MAX_TOKENS else _MAX_TOKENS
    return 0


_MAX_TOKENS = 2**40
_MAX_COST = Decimal(10**7)
_NO_USAGE: dict = {}


def _usage(data: dict) -> tuple[int, int, Decimal | None]:
    """Tokens in/out and cost of an `llm.call` record (flat fields or a `usage` object)."""
    usage = data.get("usage")
    if type(usage) is not dict:
        usage = _NO_USAGE
    tokens_in = _first_int(data, usage, _TOKENS_IN)
    tokens_out = _first_int(data, usage, _TOKENS_OUT)
    raw_cost = data.get("cost_usd", usage.get("cost_usd"))
    kind = type(raw_cost)
    if kind is float or kind is int or kind is str:
        try:
            cost = Decimal(raw_cost if kind is str else repr(raw_cost))
        except InvalidOperation:
            return tokens_in, tokens_out, None
        if cost.is_finite() and 0 <= cost < _MAX_COST:
            return tokens_in, tokens_out, cost
    return tokens_in, tokens_out, None


# Enum members looked up once, not per record.
_RUNNING, _ORPHANED = Run.Status.RUNNING, Run.Status.ORPHANED
_SUCCEEDED, _FAILED, _CRASHED = Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.CRASHED


def _exit_code(rec: Record) -> int | None:
    code = rec.fields(read_only=True).get("exit_code")
    return code if isinstance(code, int) and -(2**31) <= code < 2**31 else None


class _Prices:
    """The model price table, read once per batch and only if a call needs pricing."""

    def __init__(self):
        self._book: PriceBook | None = None

    def cost(self, model: str, tokens_in: int, tokens_out: int, at: datetime) -> Decimal | None:
        if self._book is None:
            self._book = ModelPrice.objects.book()
        return self._book.cost(model, tokens_in, tokens_out, at)


class _RunState:
    """What one batch changes on one run, applied in memory and saved once."""

    __slots__ = (
        "run",
        "events",
        "errors",
        "warnings",
        "tokens_in",
        "tokens_out",
        "cost",
        "parent_ref",
        "prices",
    )

    def __init__(self, run: Run, prices: _Prices):
        self.run = run
        self.prices = prices
        self.parent_ref = ""  # run_id of the run this one was forked from
        self.events = self.errors = self.warnings = self.tokens_in = self.tokens_out = 0
        self.cost = Decimal(0)

    def apply(self, rec: Record) -> None:
        run = self.run
        self.events += 1
        if rec.level == "error":
            self.errors += 1
        elif rec.level == "warn":
            self.warnings += 1
        if run.last_event_at is None or rec.ts > run.last_event_at:
            run.last_event_at = rec.ts
        if run.started_at is None:
            run.started_at = rec.ts
        if rec.slug and not run.slug:
            run.slug = rec.slug
        if rec.pid is not None:
            run.pid = rec.pid
        if rec.host:
            run.host = rec.host
        name = rec.event

        if name == "run.begin":
            data = rec.fields()
            run.status, run.exit_clean, run.finished_at, run.duration_ms = (
                _RUNNING,
                False,
                None,
                None,
            )
            run.started_at = min(run.started_at, rec.ts)
            kind = data.get("command") or data.get("kind")
            if isinstance(kind, str):
                run.kind = kind[:64]
            if isinstance(data.get("tags"), list):
                run.tags = [str(t)[:100] for t in data["tags"][:50]]
            attrs = data.get("attributes") if isinstance(data.get("attributes"), dict) else {}
            for key in ("work_rig", "work_bead", "work_mol"):
                if key in data:
                    attrs[key] = data[key]
            if attrs:
                run.attributes = {**run.attributes, **attrs}
            parent = data.get("parent_run_id")
            if isinstance(parent, str) and 0 < len(parent) <= 128:
                self.parent_ref = parent
        elif run.status == _ORPHANED:
            run.status = _RUNNING  # it spoke again: not dead after all

        if name == "phase.start":
            phase = rec.fields(read_only=True).get("phase")
            if not isinstance(phase, str):
                phase = rec.phase
            if phase:
                run.phase = phase[:64]
        elif rec.phase:
            run.phase = rec.phase

        if name == "run.exit_clean":
            run.exit_clean = True
            if run.status == _RUNNING:
                exit_code = _exit_code(rec)
                failed = (exit_code or 0) != 0 or run.phase == "FAILED"
                run.finish(_FAILED if failed else _SUCCEEDED, rec.ts, exit_code)
        elif name == "run.crashed":
            run.exit_clean = False
            run.finish(_CRASHED, rec.ts, _exit_code(rec))
        elif run.phase in TERMINAL_PHASES and run.status == _RUNNING:
            status = _SUCCEEDED if run.phase == "DONE" else _FAILED
            run.finish(status, rec.ts, _exit_code(rec))

        if name == "llm.call":
            data = rec.fields(read_only=True)
            tokens_in, tokens_out, cost = _usage(data)
            if cost is None and (tokens_in or tokens_out):
                # The client sent no cost: price the call at the price valid when it
                # happened, and keep it on the event (marked) for the provider tables.
                model = data.get("model")
                if isinstance(model, str):
                    cost = self.prices.cost(model, tokens_in, tokens_out, rec.ts)
                    if cost is not None:
                        data = rec.fields()  # changed: written from the object
                        data["cost_usd"] = float(cost)
                        data["_cost_computed"] = True
            self.tokens_in += tokens_in
            self.tokens_out += tokens_out
            if cost is not None:
                self.cost += cost

    def counters(self) -> None:
        run = self.run
        run.events_count += self.events
        run.errors_count += self.errors
        run.warnings_count += self.warnings
        run.tokens_in += self.tokens_in
        run.tokens_out += self.tokens_out
        run.cost_usd += self.cost


def _resolve_runs(project: Project, records: list[Record]) -> dict[str, _RunState]:
    """Give every record a run, creating runs as needed and locking them for the batch.

    A record without `run_id` (and no `run_id` query parameter) belongs to the
    newest running run of its slug; `run.begin` without a run_id opens a new one.
    """
    current: dict[str, str] = {}  # slug -> run_id, for records that name no run
    for rec in records:
        if rec.run_id:
            continue
        if rec.event == "run.begin" or rec.slug not in current:
            existing = None
            if rec.event != "run.begin":
                existing = (
                    Run.objects.filter(project=project, slug=rec.slug, status=Run.Status.RUNNING)
                    .order_by("-id")
                    .values_list("run_id", flat=True)
                    .first()
                )
            current[rec.slug] = existing or str(uuid7())
        rec.run_id = current[rec.slug]

    wanted: dict[str, Record] = {}  # the first record of each run names its slug
    for rec in records:
        wanted.setdefault(rec.run_id, rec)
    _create_runs(project, wanted)
    # Lock in a stable order so two batches touching the same runs cannot deadlock.
    locked = (
        Run.objects.select_for_update()
        .filter(project=project, run_id__in=list(wanted))
        .order_by("id")
    )
    prices = _Prices()
    states = {run.run_id: _RunState(run, prices) for run in locked}
    for rec in records:
        rec.run = states[rec.run_id].run
    return states


_RUN_GIVEN = ("project", "run_id", "slug", "started_at")


@cache
def _create_runs_sql() -> str:
    qn = connection.ops.quote_name
    rest = [f for f in Run._meta.concrete_fields if not f.primary_key and f.name not in _RUN_GIVEN]
    columns = [Run._meta.get_field(name).column for name in _RUN_GIVEN] + [f.column for f in rest]
    defaults = ", ".join(f"%s::{f.cast_db_type(connection)}" for f in rest)
    return (
        f"INSERT INTO {qn(Run._meta.db_table)} ({', '.join(qn(c) for c in columns)})"
        f" SELECT %s, v.run_id, v.slug, v.started_at, {defaults}"
        " FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS v(run_id, slug, started_at)"
        " ORDER BY v.run_id ON CONFLICT DO NOTHING"
    )


def _create_runs(project: Project, wanted: dict[str, Record]) -> None:
    """Create the runs a batch names that do not exist yet: one INSERT … SELECT FROM unnest.

    What `Run.objects.bulk_create(..., ignore_conflicts=True)` does, without
    preparing every default of every run in Python (~300 µs a run). Inserted in
    run_id order: two batches creating the same new runs then take their index
    locks in the same order and cannot deadlock each other.
    """
    rest = [f for f in Run._meta.concrete_fields if not f.primary_key and f.name not in _RUN_GIVEN]
    defaults = [f.get_db_prep_save(f.get_default(), connection) for f in rest]
    run_ids = list(wanted)
    with connection.cursor() as cursor:
        cursor.execute(
            _create_runs_sql(),
            [
                project.pk,
                *defaults,
                run_ids,
                [wanted[run_id].slug for run_id in run_ids],
                [wanted[run_id].ts for run_id in run_ids],
            ],
        )


def _link_parents(project: Project, states: dict[str, _RunState]) -> None:
    """Fork lineage: `run.begin` may name the run it was forked from (same project)."""
    refs = {s.parent_ref for s in states.values() if s.parent_ref}
    if not refs:
        return
    parents = dict(Run.objects.filter(project=project, run_id__in=refs).values_list("run_id", "id"))
    for state in states.values():
        parent_id = parents.get(state.parent_ref)
        if parent_id and parent_id != state.run.pk:
            state.run.parent_id = parent_id


def copy_text(value: str) -> str:
    """A text field for PostgreSQL's COPY text format (every COPY writer uses this)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return safe_text(value)  # PostgreSQL text holds neither NUL nor lone surrogates


# A timestamp in the ISO 8601 extended form both Python and PostgreSQL read the same
# way (hours, offsets and fractions within PostgreSQL's bounds): copy_rows then
# sends the client's text as is, instead of `isoformat()` (~1 µs a record).
_PLAIN_TS_PATTERN = (
    r"\d{4}-\d\d-\d\d[T ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
    r"(?:Z|[+-](?:0\d|1[0-5]):[0-5]\d)"
)
_PLAIN_TS = re.compile(_PLAIN_TS_PATTERN, re.ASCII).fullmatch
# The same test for a whole batch at once, on its timestamps joined by newlines
# (half the cost of one call a record); a batch that fails it is tested record by
# record.
_PLAIN_TS_LINES = re.compile(f"(?:{_PLAIN_TS_PATTERN}\n)*{_PLAIN_TS_PATTERN}", re.ASCII).fullmatch
_ANY_PLAIN_TS = "1970-01-01T00:00:00Z"  # stands for a record without ts_text

COPY_EVENTS = (
    "COPY runs_event (run_id, ts, seq, level, event, phase, message, data,"
    " request_id, trace_id, span_id) FROM STDIN"
)


def copy_rows(records: list[Record]) -> bytes:
    """The records as PostgreSQL COPY text: built in one buffer, sent in one write.

    Per record: one formatted prefix, the data as orjson writes it, a suffix.
    Text fields rarely hold a backslash, tab or line break, so they are tested
    together and escaped one by one only when one does.
    """
    parts: list[bytes] = []
    append = parts.append
    dumps = orjson.dumps
    texts = "\n".join([rec.ts_text or _ANY_PLAIN_TS for rec in records])
    # No text holds a line break (that would fool the joined test), and all are plain.
    all_plain = texts.count("\n") == len(records) - 1 and _PLAIN_TS_LINES(texts) is not None
    plain_ts = _PLAIN_TS
    for rec in records:
        text = f"{rec.event}\t{rec.phase}\t{rec.message}"
        if "\\" in text or "\n" in text or "\r" in text or text.count("\t") != 2:
            text = "\t".join((copy_text(rec.event), copy_text(rec.phase), copy_text(rec.message)))
        ts = rec.ts_text
        if ts is None or not (all_plain or plain_ts(ts)):
            ts = rec.ts.isoformat()
        append(f"{rec.run.id}\t{ts}\t{rec.seq}\t{rec.level}\t{text}\t".encode())
        # JSON escapes control characters itself; COPY needs its backslashes doubled.
        data = rec.data_json
        if data is None:
            data = dumps(rec.data, default=str)
        append(data.replace(b"\\", b"\\\\"))
        if rec.request_id or rec.trace_id or rec.span_id:
            ids = (copy_text(rec.request_id), copy_text(rec.trace_id), copy_text(rec.span_id))
            append(("\t" + "\t".join(ids) + "\n").encode())
        else:
            append(b"\t\t\t\n")
    return b"".join(parts)


RUN_FIELDS = [
    "slug",
    "parent",
    "kind",
    "status",
    "phase",
    "pid",
    "host",
    "started_at",
    "finished_at",
    "last_event_at",
    "exit_clean",
    "exit_code",
    "tags",
    "attributes",
    "events_count",
    "errors_count",
    "warnings_count",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "duration_ms",
    "last_seq",
]


@cache
def _save_runs_sql() -> str:
    fields = [Run._meta.get_field(name) for name in RUN_FIELDS]
    qn = connection.ops.quote_name
    assignments = ", ".join(f"{qn(f.column)} = v.{qn(f.column)}" for f in fields)
    columns = ", ".join(f"{qn(f.column)} {f.db_type(connection)}" for f in fields)
    return (
        f"UPDATE {qn(Run._meta.db_table)} AS r SET {assignments}"
        f" FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, {columns}) WHERE r.id = v.id"
    )


def _save_runs(runs: list[Run]) -> None:
    """Write the batch's changes to its runs: one UPDATE … FROM jsonb_to_recordset.

    The same as `Run.objects.bulk_update(runs, RUN_FIELDS)`, which builds a
    CASE WHEN per run and field in Python (~4 ms a run). The rows travel as one
    JSON document orjson writes in C; PostgreSQL reads each value with its
    column's type (a Decimal as its exact text, times in ISO 8601). Updated in
    id order, the order the runs were locked in.
    """
    attnames = ["id", *(Run._meta.get_field(name).attname for name in RUN_FIELDS)]
    rows = [{name: getattr(run, name) for name in attnames} for run in sorted(runs, key=_pk)]
    with connection.cursor() as cursor:
        cursor.execute(_save_runs_sql(), [orjson.dumps(rows, default=str).decode()])


def _pk(run: Run) -> int:
    return run.pk


def store_records(project: Project, pairs: list[tuple[bytes | None, Record]]) -> int:
    """Scrub, resolve runs, assign seq, COPY events and update run counters.

    Must run inside a transaction: the caller commits it together with the batch state.
    """
    records = []
    append = records.append
    for raw, rec in pairs:
        # Most records need nothing (the body scan found nothing to walk): skip the call.
        if rec.walk is not False or len(rec.message) > MAX_MESSAGE:
            scrub(raw, rec)
        append(rec)
    if not records:
        return 0
    states = _resolve_runs(project, records)
    for rec in records:
        state = states[rec.run_id]
        run = state.run
        if rec.seq is None:
            rec.seq = run.last_seq + 1
        if rec.seq > run.last_seq:
            run.last_seq = rec.seq
        state.apply(rec)
    for state in states.values():
        state.counters()
    _link_parents(project, states)
    with connection.cursor() as cursor, cursor.copy(COPY_EVENTS) as copy:
        copy.write(copy_rows(records))
    _save_runs([s.run for s in states.values()])
    from telemetry.errors import record_event_errors  # imports this module: import late

    record_event_errors(project, records)  # error-level events and crashes -> error groups
    _count_events(project, records)  # last: its row locks are held only until the commit
    return len(records)


_COUNT_EVENTS = """
INSERT INTO runs_eventcount (project_id, minute, events, errors)
SELECT %s, to_timestamp(m * 60), e, r
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS t(m, e, r)
ORDER BY m
ON CONFLICT (project_id, minute) DO UPDATE
SET events = runs_eventcount.events + excluded.events,
    errors = runs_eventcount.errors + excluded.errors
"""


_MINUTE = timedelta(minutes=1)


def _count_events(project: Project, records: list[Record]) -> None:
    """Add the batch to the per-minute event counts (EventCount), in minute order so two
    workers upserting the same minutes lock them in the same order."""
    minutes: dict[int, list[int]] = {}
    # Records come mostly in time order: compare with the current minute's bounds
    # and compute a key only when a record falls outside them.
    low = high = None
    counts = [0, 0]
    for rec in records:
        ts = rec.ts
        if low is None or not low <= ts < high:
            key = int(ts.timestamp()) // 60
            low = datetime.fromtimestamp(key * 60, UTC)
            high = low + _MINUTE
            counts = minutes.get(key) or minutes.setdefault(key, [0, 0])
        counts[0] += 1
        if rec.level == "error":
            counts[1] += 1
    keys = sorted(minutes)
    with connection.cursor() as cursor:
        cursor.execute(
            _COUNT_EVENTS,
            [
                project.pk,
                keys,
                [minutes[k][0] for k in keys],
                [minutes[k][1] for k in keys],
            ],
        )


def process_batch(batch_id: int) -> bool:
    """Process one spooled batch. Safe to call twice: the second call finds it done.

    Returns True when this call stored the batch.
    """
    from telemetry.models import IngestBatch

    try:
        with gc_paused():
            # The batch's records live and die in _store_batch's frame: freed before the
            # collector resumes, rather than walked by it once more on the way out.
            return _store_batch(batch_id)
    except Exception as exc:
        # Nothing of the batch was stored (the transaction rolled back). Count the
        # attempt; the sweeper retries it, and gives up after MAX_ATTEMPTS.
        IngestBatch.objects.filter(pk=batch_id, state=IngestBatch.State.PENDING).update(
            attempts=F("attempts") + 1, error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        IngestBatch.objects.filter(
            pk=batch_id, state=IngestBatch.State.PENDING, attempts__gte=MAX_ATTEMPTS
        ).update(state=IngestBatch.State.FAILED)
        raise


def store_events_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /api/ingest/events` body; returns the events stored."""
    # The request's line limit: the worker must keep exactly the lines it accepted.
    pairs, _, _ = parse_body(body, batch.params.get("run_id", ""), settings.INGEST_MAX_LINE_BYTES)
    return store_records(batch.project, pairs)


# Batch kind -> the function that stores one spooled body of that kind, inside the
# transaction that marks the batch done. Each takes (batch, body) and returns the
# number of items stored; every spooled endpoint shares the claim/retry logic below.
BATCH_HANDLERS = {
    "events": "runs.ingest.store_events_batch",
    "metrics": "runs.metrics.store_metrics_batch",
    "otlp_logs": "telemetry.otlp.store.store_logs_batch",
    "otlp_metrics": "telemetry.otlp.store.store_metrics_batch",
    "otlp_traces": "telemetry.otlp.store.store_traces_batch",
}


def _store_batch(batch_id: int) -> bool:
    from telemetry.models import IngestBatch

    with transaction.atomic():
        with connection.cursor() as cursor:
            # The spool row is the durable record of the batch (the request's commit
            # waited for the disk before its 202). If this commit is lost in a crash,
            # its rows and the `done` go together and the batch, body intact, is
            # processed again; so no need to wait for the WAL flush here.
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        batch = (
            # of=self: lock only the batch row. Locking the joined project row too
            # would make a second worker skip every other batch of the same project.
            IngestBatch.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("project")
            .defer("body")
            .filter(pk=batch_id, state=IngestBatch.State.PENDING)
            .first()
        )
        if batch is None:
            return False  # done already, or another worker holds it right now
        body = unspool_body(batch.unspooled())
        stored = import_string(BATCH_HANDLERS[batch.kind])(batch, body)
        batch.state = IngestBatch.State.DONE
        batch.processed_at = timezone.now()
        batch.attempts += 1
        batch.error = ""
        batch.body = b""  # the rows are the record now; keep the spool small
        batch.summary = {**batch.summary, "stored": stored}
        batch.save(
            update_fields=[
                "state",
                "processed_at",
                "attempts",
                "error",
                "body",
                "summary",
            ]
        )
        return True
