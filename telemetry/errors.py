"""Error grouping: from one occurrence to its fingerprint, and stored in its group.

The rules, with examples, are in docs/errors.md. In short, a fingerprint hashes

* the exception type (`TypeError`, `ValueError`; for an agent event without one,
  the event name),
* the first line of the message, normalised: URLs lose their query, then UUIDs,
  quoted strings, hex and numbers become placeholders,
* the top in-app stack frame: function and file (no line or column numbers,
  which move with every build; no query strings or bundle hashes),

so the same bug seen with other ids, other values or in another build is one group.

`store()` writes any number of occurrences with two statements: one upsert of
their groups (`INSERT … ON CONFLICT DO UPDATE`, which also reopens resolved
groups as regressed) and one bulk insert of the reports.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from portal.db import insert_rows
from portal.logging import request_id_var
from runs.models import LEVEL_ALIASES, Project
from telemetry.ingest.redaction import Scrubber
from telemetry.models import ErrorGroup, ErrorReport

alerts = logging.getLogger("runlens.alerts")

MAX_TEXT = 8_192
MAX_STACK = 32_768
FRAMES_KEPT = 50  # at each end of a long stack, as mature receivers do
MAX_FRAME_LINE = 2_000
MAX_GROUPED_MESSAGE = 1_024  # of a message's first line, what the fingerprint reads
ELLIPSIS = "…"
# Per call of store(), a group keeps at most this many new reports (they all count).
REPORTS_PER_GROUP_PER_CALL = 50


# --- Stacks -------------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    function: str
    file: str
    line: int | None = None
    column: int | None = None
    in_app: bool = True

    @property
    def location(self) -> str:
        """The file as shown and fingerprinted: a path, without origin or query."""
        return _file_path(self.file)


# V8 (Chrome, Node, Edge): "    at fn (https://x/app.js:10:5)" or "    at https://x/app.js:10:5"
_V8 = re.compile(
    r"^\s*at (?:(?P<fn>.+?) \((?P<loc>.+)\)|(?P<bare>\S.*))$",
)
# SpiderMonkey and JavaScriptCore: "fn@https://x/app.js:10:5", "@https://x/app.js:10:5"
_GECKO = re.compile(r"^\s*(?P<fn>[^@\s]*)@(?P<loc>\S.*)$")
# Python tracebacks: '  File "/srv/app/x.py", line 10, in handler'
_PYTHON = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<fn>.+))?$')
_LOC = re.compile(r"^(?P<file>.+?)(?::(?P<line>\d+))?(?::(?P<col>\d+))?$")

# Frames of libraries, browsers and runtimes: not where the bug is.
_NOT_IN_APP = re.compile(
    r"node_modules/|bower_components/|/vendor/|site-packages/|dist-packages/|"
    r"/lib/python\d|^<frozen |^(?:chrome|moz|safari(?:-web)?)-extension:|^webpack/bootstrap|"
    r"^native$|^<anonymous>$|^\[native code\]$|^node:|^internal/|^index \d+$",
)


def _location(text: str) -> tuple[str, int | None, int | None]:
    text = text.strip()
    match = _LOC.match(text)
    if match is None:
        return text, None, None
    line, col = match.group("line"), match.group("col")
    return match.group("file"), int(line) if line else None, int(col) if col else None


def parse_stack(stack: str) -> list[Frame]:
    """Frames of a JavaScript or Python stack, innermost (the crash) first."""
    frames: list[Frame] = []
    python = False
    for raw in stack.splitlines()[: 4 * FRAMES_KEPT]:
        if len(raw) > MAX_FRAME_LINE:
            continue  # not a frame; and the patterns below need not prove it at length
        if match := _PYTHON.match(raw):
            python = True
            frames.append(
                Frame(match.group("fn") or "?", match.group("file"), int(match.group("line")))
            )
        elif match := _V8.match(raw):
            loc = match.group("loc") or match.group("bare")
            function = match.group("fn") or "?"
            if loc.startswith("eval at ") or ", " in loc:
                loc = loc.rsplit(", ", 1)[-1]  # "eval at f (x.js:1:2), <anonymous>:3:4"
            file, line, col = _location(loc)
            frames.append(Frame(function.removeprefix("async "), file, line, col))
        elif (match := _GECKO.match(raw)) and ":" in match.group("loc"):
            file, line, col = _location(match.group("loc"))
            frames.append(Frame(match.group("fn") or "?", file, line, col))
    if python:
        frames.reverse()  # Python prints the innermost frame last
    for frame in frames:
        frame.in_app = _NOT_IN_APP.search(frame.file) is None
    return frames


def top_frame(frames: list[Frame]) -> Frame | None:
    """The innermost in-app frame: where the bug most likely is."""
    for frame in frames:
        if frame.in_app:
            return frame
    return frames[0] if frames else None


def _file_path(file: str) -> str:
    parts = urlsplit(file) if "://" in file else None
    if parts is not None and parts.scheme in ("http", "https", "file", "webpack"):
        return parts.path or "/"
    return file.split("?", 1)[0].split("#", 1)[0]


# --- Types and messages -------------------------------------------------------

_TYPED = re.compile(
    r"^(?:Uncaught\s+)?(?:\(in promise\)\s+)?"
    r"(?P<type>[A-Za-z_$][\w$.]*(?:Error|Exception|Warning|Interrupt|Exit|Fault)|Error)"
    r"(?::\s*(?P<message>.*)|\s*)$"
)
_UNCAUGHT = re.compile(r"^Uncaught\s+(?:\(in promise\)\s+)?")


def split_type(text: str) -> tuple[str, str]:
    """("TypeError", "x is undefined") from "Uncaught TypeError: x is undefined"."""
    first = first_line(text)
    match = _TYPED.match(first)
    if match:
        return match.group("type"), (match.group("message") or "").strip()
    return "", _UNCAUGHT.sub("", first)


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def last_line(text: str) -> str:
    lines = text.rstrip().splitlines()
    return lines[-1].strip() if lines else ""


# Schemes are bounded ({0,31}): unbounded, a long run of letters costs quadratic time.
_URL = re.compile(r"\b([a-z][a-z0-9+.\-]{0,31}://[^\s?#'\"<>]*)(?:[?#][^\s'\"<>]*)?", re.IGNORECASE)
_UUID = re.compile(
    r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b", re.IGNORECASE
)
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|`[^`\n]*`")
_TIMESTAMP = re.compile(
    r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?",
    re.IGNORECASE,
)
_HEX = re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.I)
# A number, also with a unit ("1.5s", "300ms"), but not inside a word ("utf8", "h1").
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*(?=[a-zA-Z]{0,2}\b)")


def normalize_message(text: str) -> str:
    """The message as grouped: variable parts replaced by placeholders.

    The one masking of the project: beacon reports and agent events (here) and Sentry
    events (telemetry/sentry/grouping.py) all group through it. Order matters: a
    URL's query may hold quotes and numbers, a UUID holds hex and digits, a quoted
    string may hold anything.
    """
    text = _URL.sub(lambda m: m.group(1) + ("?<query>" if m.group(0) != m.group(1) else ""), text)
    text = _UUID.sub("<uuid>", text)
    text = _TIMESTAMP.sub("<ts>", text)
    text = _QUOTED.sub("<str>", text)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("<n>", text)
    return text


def normalize_file(file: str) -> str:
    """A file as grouped: content hashes and chunk numbers of bundles do not split groups."""
    return _NUMBER.sub("<n>", _HEX.sub("<hex>", _file_path(file)))


# --- Occurrences ----------------------------------------------------------------


@dataclass
class Occurrence:
    """One error as received, before it is grouped and stored."""

    source: str
    message: str = ""
    error: str = ""
    stack: str = ""
    level: str = "error"
    context: dict = field(default_factory=dict)
    url: str = ""
    visitor: str = ""
    request_id: str = ""
    run_id: int | None = None
    event_seq: int | None = None
    received_at: datetime = field(default_factory=timezone.now)
    # When nothing better names a type (agent events): the event name.
    fallback_type: str = ""
    # When the stack has no frame: where it happened (page path, event and phase).
    fallback_culprit: str = ""
    # Sentry events are grouped by their own rules (telemetry/sentry/grouping.py): the
    # key to hash, the title and the culprit, instead of those read from the text.
    group_key: str = ""
    given_title: str = ""
    given_culprit: str = ""
    event_id: str = ""
    release: str = ""
    environment: str = ""
    event: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_key:
            self.frames = []
            self.type = ""
            self.title = _cut(self.given_title or "(no message)", 255)
            self.culprit = _cut(self.given_culprit, 255)
            self.fingerprint = hashlib.sha256(self.group_key.encode()).hexdigest()
            return
        self.frames = parse_stack(self.stack)
        self.type, detail = self._type_and_detail()
        frame = top_frame(self.frames)
        if frame is not None:
            self.culprit = f"{frame.function} ({frame.location})"
            frame_key = f"{frame.function} {normalize_file(frame.file)}"
        else:
            self.culprit = self.fallback_culprit
            frame_key = ""
        self.title = f"{self.type}: {detail}" if self.type and detail else self.type or detail
        self.title = _cut(self.title or "(no message)", 255)
        self.culprit = _cut(self.culprit, 255)
        key = "\n".join((self.type, normalize_message(detail[:MAX_GROUPED_MESSAGE]), frame_key))
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()

    def _type_and_detail(self) -> tuple[str, str]:
        # The most precise source first: error.toString() is "Type: message";
        # a V8 stack starts with the same line; the message may be "Uncaught Type: …".
        # A Python traceback ends with "module.Type: message".
        lines = (first_line(self.stack), last_line(self.stack))
        for i, text in enumerate((self.error, self.message, *lines)):
            kind, detail = split_type(text)
            if kind:
                if not detail and i != 1:
                    detail = split_type(self.message)[1]
                return kind, detail
        detail = first_line(self.message) or first_line(self.error) or first_line(self.stack)
        return self.fallback_type, _UNCAUGHT.sub("", detail)

    def report(self, group_id: int, project_id: int) -> ErrorReport:
        return ErrorReport(
            group_id=group_id,
            project_id=project_id,
            source=self.source,
            level=self.level,
            message=self.message,
            error=self.error,
            stack=self.stack,
            context=self.context,
            url=self.url,
            visitor=self.visitor,
            request_id=self.request_id,
            run_id=self.run_id,
            event_seq=self.event_seq,
            received_at=self.received_at,
            event_id=self.event_id,
            release=self.release,
            environment=self.environment,
            event=self.event,
        )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


# --- Storing ------------------------------------------------------------------

_UPSERT_GROUPS = """
WITH input AS (
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
        %s::timestamptz[], %s::timestamptz[], %s::bigint[]
    ) AS t(fingerprint, title, culprit, level, source, first_seen, last_seen, n)
),
old AS (
    SELECT fingerprint, status FROM telemetry_errorgroup
    WHERE project_id = %s AND fingerprint IN (SELECT fingerprint FROM input)
),
up AS (
    INSERT INTO telemetry_errorgroup AS g (
        project_id, fingerprint, title, culprit, level, source, status,
        first_seen, last_seen, count, regressed
    )
    SELECT %s, fingerprint, title, culprit, level, source, 'unresolved',
           first_seen, last_seen, n, false
    FROM input ORDER BY fingerprint
    ON CONFLICT (project_id, fingerprint) DO UPDATE SET
        last_seen = GREATEST(g.last_seen, EXCLUDED.last_seen),
        first_seen = LEAST(g.first_seen, EXCLUDED.first_seen),
        count = g.count + EXCLUDED.count,
        level = EXCLUDED.level,
        regressed = g.regressed OR g.status = 'resolved',
        status = CASE WHEN g.status = 'resolved' THEN 'unresolved' ELSE g.status END,
        resolved_at = CASE WHEN g.status = 'resolved' THEN NULL ELSE g.resolved_at END
    RETURNING g.id, g.fingerprint, g.title
)
SELECT up.id, up.fingerprint, up.title, old.status
FROM up LEFT JOIN old USING (fingerprint)
"""


def store(project: Project, occurrences: Iterable[Occurrence]) -> list[ErrorReport]:
    """Group and store occurrences of one project: two statements however many there are.

    New groups and regressions (a resolved group seen again) log a warning on
    `runlens.alerts`; ignored groups count their reports but never alert.
    """
    by_print: dict[str, list[Occurrence]] = {}
    for occ in occurrences:
        by_print.setdefault(occ.fingerprint, []).append(occ)
    if not by_print:
        return []
    prints = sorted(by_print)  # a stable lock order: concurrent upserts cannot deadlock
    columns: list[list[Any]] = [[] for _ in range(8)]
    for fp in prints:
        group = by_print[fp]
        latest = max(group, key=lambda o: o.received_at)
        values = (
            fp,
            group[0].title,
            group[0].culprit,
            latest.level,
            latest.source,
            min(o.received_at for o in group),
            latest.received_at,
            len(group),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)

    # No savepoint when called inside the ingest batch's transaction: one round trip less.
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        cursor.execute(_UPSERT_GROUPS, [*columns, project.pk, project.pk])
        rows = cursor.fetchall()
        reports = []
        for group_id, fp, title, old_status in rows:
            if old_status is None:
                alerts.warning(
                    "new error group: %s", title, extra={"group": group_id, "project": project.slug}
                )
            elif old_status == ErrorGroup.Status.RESOLVED:
                alerts.warning(
                    "error group regressed: %s",
                    title,
                    extra={"group": group_id, "project": project.slug},
                )
            kept = by_print[fp][-REPORTS_PER_GROUP_PER_CALL:]
            reports.extend(occ.report(group_id, project.pk) for occ in kept)
        return insert_rows(ErrorReport, reports)


# --- From agent events ----------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def record_event_errors(project: Project, records: list) -> int:
    """Error-level events and `run.crashed` become error reports, linked to their run.

    Called by telemetry.ingest.store.store_records inside the batch's transaction, after
    the records were scrubbed and given their runs. Returns the number of
    occurrences (all counted; see store() for what is kept).
    """
    chosen = [r for r in records if r.level == "error" or r.event == "run.crashed"]
    if not chosen:
        return 0
    fallback_request = request_id_var.get()  # the ingest request's, set by portal.celery
    occurrences = []
    for rec in chosen:
        data = rec.fields(read_only=True)
        error = data.get("error")
        if isinstance(error, dict):  # {"type": …, "message": …, "stack": …}
            kind, detail = _text(error.get("type")), _text(error.get("message"))
            stack = _text(error.get("stack") or error.get("traceback"))
            error = f"{kind}: {detail}" if kind else detail
        else:
            error = _text(error or data.get("exception"))
            stack = ""
        stack = stack or _text(data.get("stack") or data.get("traceback") or data.get("stacktrace"))
        message = rec.message or _text(data.get("message") or data.get("reason")) or error
        if not message and rec.event == "run.crashed":
            code = data.get("exit_code")
            message = "run crashed" + (f" with exit code {code}" if code is not None else "")
        context = {
            "event": rec.event,
            "slug": rec.slug,
            "phase": rec.phase,
            "ts": rec.ts.isoformat(timespec="milliseconds"),
        }
        context.update({k: v for k, v in (("host", rec.host), ("pid", rec.pid)) if v})
        context["data"] = data
        where = rec.event + (f" in {rec.phase}" if rec.phase else "")
        occurrences.append(
            Occurrence(
                source=ErrorReport.Source.EVENT,
                level="error",
                message=_cut(message, MAX_TEXT),
                error=_cut(error, MAX_TEXT),
                stack=trim_stack(stack),
                context=context,
                request_id=rec.request_id or fallback_request,
                run_id=rec.run.pk if rec.run is not None else None,
                event_seq=rec.seq,
                fallback_type=rec.event,
                fallback_culprit=f"{where} · {rec.slug}" if rec.slug else where,
            )
        )
    store(project, occurrences)
    return len(occurrences)


# --- From the browser beacon ----------------------------------------------------


def trim_stack(stack: str) -> str:
    """Keep 50 frames at each end of a deep stack (recursion), and a bounded size."""
    lines = stack.splitlines()
    if len(lines) > 2 * FRAMES_KEPT + 1:
        cut = len(lines) - 2 * FRAMES_KEPT
        lines = [
            *lines[:FRAMES_KEPT],
            f"{ELLIPSIS} {cut} frames cut {ELLIPSIS}",
            *lines[-FRAMES_KEPT:],
        ]
        stack = "\n".join(lines)
    return _cut(stack, MAX_STACK)


def visitor_key(user: Any, address: str, agent: str) -> str:
    """An opaque key for "users affected": the app's user id when the page sends one,
    else its address and browser, keyed with the secret so it cannot be reversed."""
    basis = f"user:{user}" if user not in (None, "") else f"ip:{address}|ua:{agent}"
    return hmac.new(settings.SECRET_KEY.encode(), basis.encode(), hashlib.sha256).hexdigest()[:16]


def page_path(url: str) -> str:
    """A page's address without query and fragment (they hold tokens and ids)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    return _cut(f"{parts.scheme}://{parts.netloc}{parts.path}", 500)


def beacon_occurrence(
    body: dict, *, client_address: str, request_id: str, run_id: int | None = None
) -> Occurrence:
    """One beacon body `{level, message, error, stack, context, …}` as an occurrence.

    Unknown top-level fields are kept in the context; secrets are redacted,
    NULs and lone surrogates cleaned, sizes bounded (a `_truncated` flag says so).
    """
    scrubber = Scrubber(redact=True)
    context = body.get("context")
    context = dict(context) if isinstance(context, dict) else {}
    known = {"level", "message", "error", "stack", "context"}
    for key, value in body.items():
        if key not in known:
            context.setdefault(key, value)
    context = scrubber.walk(context, 1)

    def text(key: str, limit: int) -> str:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            value = scrubber.walk(value, 1)
            value = str(value)
        return scrubber.text(value or "", limit)

    message, error = text("message", MAX_TEXT), text("error", MAX_TEXT)
    stack = text("stack", 4 * MAX_STACK)
    trimmed = trim_stack(stack)
    if scrubber.truncated or trimmed != stack:
        context["_truncated"] = True
    raw_level = body.get("level")
    level = LEVEL_ALIASES.get(raw_level.lower(), "error") if isinstance(raw_level, str) else "error"
    url = _text(context.get("url"))
    user = context.get("user_id", context.get("user"))
    if isinstance(user, dict):
        user = user.get("id")
    path = page_path(url)
    return Occurrence(
        source=ErrorReport.Source.FRONTEND,
        level=level,
        message=message,
        error=error,
        stack=trimmed,
        context=context,
        url=path,
        visitor=visitor_key(user, client_address, _text(context.get("ua"))[:500]),
        request_id=request_id,
        run_id=run_id,
        fallback_culprit=urlsplit(path).path if path else "",
    )
