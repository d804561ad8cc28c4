"""`ship`: send JSONL trace files to a Runlens portal, remembering how far each was sent.

Each file is one run (the Gitoma layout `<owner>__<repo>/<iso-timestamp>.jsonl`), so
every request names its run with a `run_id` derived from the file. Only complete
lines are sent, in gzip batches; the offset after a batch is saved only once the
portal answered 202, and each batch carries an `Idempotency-Key` built from the file
and the byte range, so a retry or a restart never stores a line twice.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from urllib.parse import urlencode

from django.core.management.base import BaseCommand, CommandError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_STATE = "~/.runlens/ship-state.json"
MAX_LINES = 1000
MAX_BYTES = 1 << 20
MAX_RUN_ID = 128
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 30
# Answers that will not change on a retry of the same batch: judge it, report, move on.
BATCH_REFUSED = {400, 413, 422}


@dataclass(slots=True)
class Batch:
    start: int  # byte offset of the first line
    end: int  # byte offset just after the last newline
    body: bytes
    lines: int  # non-blank lines in the body


@dataclass(slots=True)
class Totals:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0


class ShipError(Exception):
    """Shipping cannot go on (portal unreachable, token refused): stop, keep the offsets."""


def run_id_for(path: Path) -> str:
    """`<slug>@<file stem>`, stable for the life of the file, at most 128 characters.

    No `/`: a run id is one segment of the API's URLs (`/api/runs/<run_id>`).
    """
    slug = path.parent.name if "__" in path.parent.name else path.stem
    run_id = f"{slug}@{path.stem}"
    if len(run_id) > MAX_RUN_ID:
        # Keep it readable and still unique: a prefix plus a hash of the whole.
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        run_id = f"{run_id[: MAX_RUN_ID - 17]}~{digest}"
    return run_id


def find_files(paths: list[str]) -> list[Path]:
    """Files named on the command line, and `*.jsonl` below named directories, oldest first.

    Gitoma names files by timestamp, so path order is start order within a slug,
    and the newest run of a slug is also the one created last.
    """
    found: set[Path] = set()
    for name in paths:
        path = Path(name).expanduser().resolve()
        if path.is_dir():
            found.update(p for p in path.rglob("*.jsonl") if p.is_file())
        elif path.is_file():
            found.add(path)
    return sorted(found)


def read_batch(path: Path, start: int, max_lines: int, max_bytes: int) -> Batch | None:
    """The next run of complete lines from `start`, or None when none is complete yet."""
    with path.open("rb") as fh:
        fh.seek(start)
        chunk = fh.read(max_bytes)
        if b"\n" not in chunk:
            return _skip_long_line(fh, start, chunk) if len(chunk) == max_bytes else None
    cut = 0
    for _ in range(max_lines):
        newline = chunk.find(b"\n", cut)
        if newline < 0:
            break
        cut = newline + 1
    body = chunk[:cut]
    lines = sum(1 for line in body.split(b"\n") if line.strip())
    return Batch(start, start + cut, body, lines)


def _skip_long_line(fh, start: int, chunk: bytes) -> Batch | None:
    """A line longer than a whole batch: the portal would refuse it, so step over it."""
    seen = len(chunk)
    while block := fh.read(MAX_BYTES):
        newline = block.find(b"\n")
        if newline >= 0:
            return Batch(start, start + seen + newline + 1, b"", 1)
        seen += len(block)
    return None  # still being written


class State:
    """Offsets per file, keyed by absolute path and inode, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.files: dict[str, dict] = json.loads(path.read_text()).get("files", {})
        except FileNotFoundError:
            self.files = {}
        except (ValueError, AttributeError) as exc:
            raise CommandError(
                f"state file {path} is not valid JSON ({exc}); move it away"
            ) from None

    def entry(self, path: Path) -> tuple[str, dict]:
        key = f"{path}:{path.stat().st_ino}"
        return key, self.files.setdefault(key, {"offset": 0, "line": 0})

    def forget_missing(self) -> None:
        """Drop files that are gone (retention prunes old traces) so the state stays small."""
        gone = [key for key in self.files if not _same_file(key)]
        for key in gone:
            del self.files[key]
        if gone:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory + os.replace: a crash leaves the old or the new file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ship-state-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "files": self.files}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _same_file(key: str) -> bool:
    path, _, inode = key.rpartition(":")
    try:
        return str(os.stat(path).st_ino) == inode
    except OSError:
        return False


class Portal:
    """The ingest endpoint over urllib, with bounded retries on 429, 5xx and network errors."""

    def __init__(self, url: str, token: str, retries: int):
        self.url = url.rstrip("/") + "/api/ingest/events"
        self.token = token
        self.retries = max(1, retries)

    def send(self, body: bytes, run_id: str, key: str) -> tuple[int, dict]:
        delay = 0.5
        for attempt in range(1, self.retries + 1):
            try:
                return self._post(body, run_id, key)
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    return exc.code, _json(exc.read())
                problem = f"HTTP {exc.code}"
                wait = _retry_after(exc.headers.get("Retry-After"), delay)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                problem = str(getattr(exc, "reason", exc))
                wait = delay
            if attempt == self.retries:
                raise ShipError(f"{problem} after {attempt} attempt(s); will resume from here")
            sleep(wait)
            delay = min(delay * 2, 30)
        raise AssertionError("unreachable")

    def _post(self, body: bytes, run_id: str, key: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.url}?{urlencode({'run_id': run_id})}",
            data=gzip.compress(body, compresslevel=6),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/x-ndjson",
                "Content-Encoding": "gzip",
                "Idempotency-Key": key,
                "User-Agent": "runlens-ship/1",
            },
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return response.status, _json(response.read())


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"detail": raw[:300].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"detail": str(value)[:300]}


def _retry_after(header: str | None, default: float) -> float:
    try:
        return min(max(float(header), 0.0), 60.0) if header else default
    except ValueError:
        return default


def idempotency_key(file_key: str, start: int, end: int) -> str:
    """Same file and byte range, same key: the portal answers a resend from its record.

    The host is part of the file's identity: two machines may hold the same path.
    """
    identity = f"{socket.gethostname()}\0{file_key}\0{start}\0{end}"
    return "ship-" + hashlib.sha256(identity.encode()).hexdigest()


class Command(BaseCommand):
    help = "Send JSONL trace files (the Gitoma layout too) to a Runlens portal."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
        parser.add_argument("--url", default=os.environ.get("RUNLENS_URL") or DEFAULT_URL)
        parser.add_argument("--token", default=os.environ.get("RUNLENS_TOKEN", ""))
        parser.add_argument("--state", default=DEFAULT_STATE, help="offsets file")
        parser.add_argument("--follow", action="store_true", help="keep sending until Ctrl-C")
        parser.add_argument("--retries", type=int, default=5, help="attempts per batch")

    def handle(self, paths, url, token, state, follow, retries, **options):
        if not token:
            raise CommandError("no ingest token: pass --token or set RUNLENS_TOKEN")
        self.portal = Portal(url, token, retries)
        self.state = State(Path(state).expanduser())
        for name in paths:
            if not Path(name).expanduser().exists():
                self.stderr.write(f"{name}: no such file or directory (yet)")
        try:
            self.ship_all(paths, quiet=False)
            while follow:
                sleep(POLL_SECONDS)
                self.ship_all(paths, quiet=True)
        except KeyboardInterrupt:
            self.stdout.write("stopped; offsets saved")
        except ShipError as exc:
            raise CommandError(str(exc)) from None

    def ship_all(self, paths: list[str], quiet: bool) -> None:
        """One pass over every file; `quiet` (follow mode) reports only files that moved."""
        self.state.forget_missing()
        files = find_files(paths)
        if not files and not quiet:
            self.stderr.write("no files to ship")
        for path in files:
            totals = self.ship_file(path)
            if totals.sent or totals.rejected or not quiet:
                self.stdout.write(
                    f"{path} -> {run_id_for(path)}: {totals.sent} line(s) sent, "
                    f"{totals.accepted} accepted, {totals.rejected} rejected"
                )

    def ship_file(self, path: Path) -> Totals:
        totals = Totals()
        try:
            key, entry = self.state.entry(path)
            if path.stat().st_size < entry["offset"]:
                self.stderr.write(f"{path}: shrank since last time; sending it from the start")
                entry.update(offset=0, line=0)
        except FileNotFoundError:
            return totals  # removed since it was listed
        max_lines = MAX_LINES
        while batch := read_batch(path, entry["offset"], max_lines, MAX_BYTES):
            if not self.send(path, key, batch, entry["line"], totals):
                # 413: the portal takes smaller bodies than ours; halve and try again.
                max_lines = max(1, batch.body.count(b"\n") // 2)
                continue
            entry["offset"] = batch.end
            entry["line"] += batch.body.count(b"\n") if batch.body else 1
            self.state.save()  # only now: the portal has answered for this batch
        return totals

    def send(self, path: Path, file_key: str, batch: Batch, line0: int, totals: Totals) -> bool:
        """Send one batch; False asks for a smaller one. `line0`: lines before the batch."""
        if not batch.body:
            totals.rejected += 1
            self.stderr.write(f"{path}:{line0 + 1}: line longer than {MAX_BYTES} bytes, skipped")
            return True
        if not batch.lines:
            return True  # only blank lines: nothing to send, but step over them
        key = idempotency_key(file_key, batch.start, batch.end)
        status, answer = self.portal.send(batch.body, run_id_for(path), key)
        if status == 413 and batch.lines > 1:
            return False
        if not 200 <= status < 300 and status not in BATCH_REFUSED:
            # 401, 404, 415…: every later batch would get the same answer, so stop here
            # rather than skip them all; the offset stays before this batch.
            raise ShipError(f"portal answered {status}: {answer.get('detail', answer)}")
        totals.sent += batch.lines
        totals.accepted += int(answer.get("accepted") or 0)
        rejected = int(answer.get("rejected") or 0)
        if not 200 <= status < 300 and not answer.get("errors"):
            rejected = batch.lines  # refused whole, without per-line verdicts
            self.stderr.write(f"{path}: batch refused ({status}): {answer.get('detail', answer)}")
        totals.rejected += rejected
        for error in answer.get("errors") or []:
            self.stderr.write(f"{path}:{line0 + int(error.get('line', 0))}: {error.get('error')}")
        return True
