"""Run-event ingestion: from a request body to rows in `runs_event`.

Two halves share one judge (`normalize`), so a line the request counted as
accepted is exactly a line the worker stores:

* the request (`read_body`, `parse_body`) decompresses within limits and judges
  each line, then the raw body is spooled as an IngestBatch;
* the worker (`process_batch`) parses the spooled body again, scrubs secrets and
  unsafe characters, resolves runs, assigns `seq`, and writes events with one
  `COPY` in the same transaction that marks the batch done.

Expensive walks over the data (redaction, NUL/surrogate cleaning, depth and
length bounds) run only when a cheap test on the raw line says they may matter.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from runs.ids import uuid7
from runs.models import TERMINAL_PHASES, Project, Run

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
_KEY_HINT = re.compile(
    rb'(?i)(?:passw|pwd|secret|token"|_token|api_?key|private_key|credential|authorization|cookie)'
)
_VALUE_HINT = re.compile(rb"(?i)(?:bearer|basic |://[^/\s\"]*@|gh[pousr]_|sk-)")
_SECRET_VALUE = re.compile(
    r"(?i)(?P<scheme>\bbearer\s+|\bbasic\s+)[A-Za-z0-9._~+/=\-]+"
    r"|(?P<url>[a-z][a-z0-9+.\-]*://)[^/\s\"'@]+@"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bsk-[A-Za-z0-9_\-]{20,}"
)
_UNSAFE_HINT = (b"\\u0000", b"\\ud", b"\\uD")
_BIG_INT = re.compile(rb"\d{20}")


class IngestError(Exception):
    """A whole request is refused: status code and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class LineError(ValueError):
    pass


# --- Request side -----------------------------------------------------------


def read_body(stream, encoding: str, limit: int) -> bytes:
    """Read and decompress a request body, refusing it as soon as it passes `limit`.

    The limit applies to the decompressed size and is enforced while streaming,
    so a small gzip bomb is cut off after `limit` bytes of output, not after
    inflating it in memory.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        decompressor = None
    elif encoding in ("gzip", "x-gzip"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
    else:
        raise IngestError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or deflate")

    out = bytearray()
    raw_seen = 0
    while True:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        raw_seen += len(chunk)
        if raw_seen > limit + 65536:
            raise IngestError(413, f"body larger than {limit} bytes")
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
            except zlib.error:
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


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses invalid UTF-8 and lone surrogates; the stdlib parser on
        # a replaced decode accepts both, and scrubbing cleans what is left.
        return json.loads(raw.decode("utf-8", "replace"))


def _parse_ts(value: Any) -> datetime:
    if isinstance(value, str):
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


@dataclass(slots=True)
class Record:
    ts: datetime
    event: str
    level: str
    slug: str
    phase: str
    data: dict
    run_id: str
    seq: int | None
    message: str
    pid: int | None
    host: str
    request_id: str
    trace_id: str
    span_id: str
    truncated: bool = False
    run: Run | None = field(default=None, repr=False)


def normalize(obj: Any, default_run_id: str = "") -> Record:
    """Judge one record against the Gitoma schema (plus our optional fields)."""
    if not isinstance(obj, dict):
        raise LineError("record must be a JSON object")
    event = obj.get("event")
    if not isinstance(event, str) or not event.strip():
        raise LineError("event: required non-empty string")
    if len(event) > 200:
        raise LineError("event: longer than 200 characters")
    level_raw = obj.get("level") or "info"
    level = LEVELS.get(level_raw.lower()) if isinstance(level_raw, str) else None
    if level is None:
        raise LineError("level: must be one of debug, info, warn, error")
    data = obj.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise LineError("data: must be a JSON object")
    message = obj.get("message")
    if message is None:
        message = ""
    elif not isinstance(message, str):
        raise LineError("message: must be a string")
    run_id = _opt_str(obj, "run_id", 128) or default_run_id
    return Record(
        ts=_parse_ts(obj.get("ts")),
        event=event.strip(),
        level=level,
        slug=_opt_str(obj, "slug", 200),
        phase=_opt_str(obj, "phase", 64),
        data=data,
        run_id=run_id,
        seq=_opt_int(obj, "seq"),
        message=message,
        pid=_opt_int(obj, "pid"),
        host=_opt_str(obj, "host", 255),
        request_id=_opt_str(obj, "request_id", 128),
        trace_id=_opt_str(obj, "trace_id", 64),
        span_id=_opt_str(obj, "span_id", 32),
    )


def _documents(body: bytes, max_line: int) -> Iterator[tuple[int, bytes | Any]]:
    """Yield (line number, raw line) for NDJSON, or (index + 1, object) for an array."""
    stripped = body.lstrip()
    if stripped[:1] == b"[":
        try:
            items = _loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise IngestError(400, f"body is not a valid JSON array: {exc}") from None
        if not isinstance(items, list):
            raise IngestError(400, "body is not a valid JSON array")
        yield from enumerate(items, 1)
        return
    for number, line in enumerate(body.split(b"\n"), 1):
        if len(line) > max_line:
            yield number, LineError(f"line longer than {max_line} bytes")
            continue
        line = line.strip()
        if line:
            yield number, line


def parse_body(
    body: bytes,
    default_run_id: str = "",
    max_line: int = 1 << 20,
    max_errors: int = 100,
) -> tuple[list[tuple[bytes | None, Record]], int, list[dict]]:
    """Judge every line. Returns (good records with their raw line, rejected count, errors)."""
    good: list[tuple[bytes | None, Record]] = []
    errors: list[dict] = []
    rejected = 0
    for number, doc in _documents(body, max_line):
        try:
            if isinstance(doc, LineError):
                raise doc
            raw = doc if isinstance(doc, bytes) else None
            obj = _loads(doc) if raw is not None else doc
            good.append((raw, normalize(obj, default_run_id)))
        except (LineError, ValueError, RecursionError) as exc:
            rejected += 1
            if len(errors) < max_errors:
                message = str(exc) if isinstance(exc, LineError) else f"invalid JSON: {exc}"
                errors.append({"line": number, "error": message[:300]})
    return good, rejected, errors


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
        if self.redact:
            value = _SECRET_VALUE.sub(_redact_match, value)
        if len(value) > limit:
            self.truncated = True
            value = value[: limit - 1] + ELLIPSIS
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


def scrub(raw: bytes | None, record: Record) -> None:
    """Make a record safe for PostgreSQL and free of secrets, walking only when needed."""
    if raw is None:  # from a JSON array: no raw line to test cheaply
        try:
            raw = orjson.dumps({"d": record.data, "m": record.message}, default=str)
        except TypeError:  # an integer orjson cannot write: walk to fix it
            raw = _UNSAFE_HINT[0]
    redact = bool(_KEY_HINT.search(raw) or _VALUE_HINT.search(raw))
    deep = raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
    unsafe = (
        any(hint in raw for hint in _UNSAFE_HINT)
        or b"\xef\xbf\xbd" in raw
        or _BIG_INT.search(raw) is not None
    )
    if redact or deep or unsafe or len(raw) > MAX_STRING:
        scrubber = _Scrubber(redact)
        record.data = scrubber.walk(record.data, 0)
        record.message = scrubber.text(record.message, MAX_MESSAGE)
        record.slug = scrubber.text(record.slug, 200)
        record.phase = scrubber.text(record.phase, 64)
        record.event = scrubber.text(record.event, 200)
        record.truncated = scrubber.truncated
    elif len(record.message) > MAX_MESSAGE:
        record.message = record.message[: MAX_MESSAGE - 1] + ELLIPSIS
        record.truncated = True
    if record.truncated:
        record.data["_truncated"] = True


# --- Worker side: runs and lifecycle ----------------------------------------


def _usage(data: dict) -> tuple[int, int, Decimal | None]:
    """Tokens in/out and cost of an `llm.call` record (flat fields or a `usage` object)."""
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}

    def first_int(*keys: str) -> int:
        for source in (data, usage):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    return min(value, 2**40)
        return 0

    tokens_in = first_int("tokens_in", "input_tokens", "prompt_tokens")
    tokens_out = first_int("tokens_out", "output_tokens", "completion_tokens")
    cost = None
    raw_cost = data.get("cost_usd", usage.get("cost_usd"))
    if isinstance(raw_cost, (int, float, str)) and not isinstance(raw_cost, bool):
        try:
            cost = Decimal(str(raw_cost))
            if not cost.is_finite() or not 0 <= cost < 10**7:
                cost = None
        except InvalidOperation:
            cost = None
    return tokens_in, tokens_out, cost


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
    )

    def __init__(self, run: Run):
        self.run = run
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
        data = rec.data
        name = rec.event

        if name == "run.begin":
            run.status, run.exit_clean, run.finished_at, run.duration_ms = (
                Run.Status.RUNNING,
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
        elif run.status == Run.Status.ORPHANED:
            run.status = Run.Status.RUNNING  # it spoke again: not dead after all

        if name == "phase.start":
            phase = data.get("phase") if isinstance(data.get("phase"), str) else rec.phase
            if phase:
                run.phase = phase[:64]
        elif rec.phase:
            run.phase = rec.phase

        exit_code = data.get("exit_code")
        exit_code = (
            exit_code if isinstance(exit_code, int) and -(2**31) <= exit_code < 2**31 else None
        )
        if name == "run.exit_clean":
            run.exit_clean = True
            if run.status == Run.Status.RUNNING:
                failed = (exit_code or 0) != 0 or run.phase == "FAILED"
                run.finish(
                    Run.Status.FAILED if failed else Run.Status.SUCCEEDED,
                    rec.ts,
                    exit_code,
                )
        elif name == "run.crashed":
            run.exit_clean = False
            run.finish(Run.Status.CRASHED, rec.ts, exit_code)
        elif run.phase in TERMINAL_PHASES and run.status == Run.Status.RUNNING:
            status = Run.Status.SUCCEEDED if run.phase == "DONE" else Run.Status.FAILED
            run.finish(status, rec.ts, exit_code)

        if name == "llm.call":
            tokens_in, tokens_out, cost = _usage(data)
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
    Run.objects.bulk_create(
        [
            Run(project=project, run_id=run_id, slug=rec.slug, started_at=rec.ts)
            for run_id, rec in wanted.items()
        ],
        ignore_conflicts=True,
    )
    # Lock in a stable order so two batches touching the same runs cannot deadlock.
    locked = (
        Run.objects.select_for_update()
        .filter(project=project, run_id__in=list(wanted))
        .order_by("id")
    )
    states = {run.run_id: _RunState(run) for run in locked}
    for rec in records:
        rec.run = states[rec.run_id].run
    return states


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


def _copy_text(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return value


COPY_EVENTS = (
    "COPY runs_event (run_id, ts, seq, level, event, phase, message, data,"
    " request_id, trace_id, span_id) FROM STDIN"
)


def copy_rows(records: list[Record]) -> bytes:
    """The records as PostgreSQL COPY text: built in one buffer, sent in one write."""
    parts: list[bytes] = []
    append = parts.append
    for rec in records:
        line = "\t".join(
            (
                str(rec.run.pk),
                rec.ts.isoformat(),
                str(rec.seq),
                rec.level,
                _copy_text(rec.event),
                _copy_text(rec.phase),
                _copy_text(rec.message),
            )
        )
        append(line.encode())
        append(b"\t")
        append(orjson.dumps(rec.data, default=str).replace(b"\\", b"\\\\"))
        append(b"\t")
        append(
            "\t".join(
                (
                    _copy_text(rec.request_id),
                    _copy_text(rec.trace_id),
                    _copy_text(rec.span_id),
                )
            ).encode()
        )
        append(b"\n")
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


def store_records(project: Project, pairs: list[tuple[bytes | None, Record]]) -> int:
    """Scrub, resolve runs, assign seq, COPY events and update run counters.

    Must run inside a transaction: the caller commits it together with the batch state.
    """
    records = []
    for raw, rec in pairs:
        scrub(raw, rec)
        records.append(rec)
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
    Run.objects.bulk_update([s.run for s in states.values()], RUN_FIELDS)
    from telemetry.errors import record_event_errors  # imports this module: import late

    record_event_errors(project, records)  # error-level events and crashes -> error groups
    return len(records)


def process_batch(batch_id: int) -> bool:
    """Process one spooled batch. Safe to call twice: the second call finds it done.

    Returns True when this call stored the batch.
    """
    from telemetry.models import IngestBatch

    try:
        with transaction.atomic():
            batch = (
                IngestBatch.objects.select_for_update(skip_locked=True)
                .select_related("project")
                .filter(pk=batch_id, state=IngestBatch.State.PENDING)
                .first()
            )
            if batch is None:
                return False  # done already, or another worker holds it right now
            body = zlib.decompress(bytes(batch.body))
            pairs, _, _ = parse_body(body, batch.params.get("run_id", ""))
            stored = store_records(batch.project, pairs)
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
