"""Unified diffs (`diff.patch` artifacts, the compare page): parsed for the diff viewer."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

MAX_DIFF_LINES = 20_000
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")


@dataclass
class DiffLine:
    kind: str  # "context", "add", "del" or "note" (`\ No newline at end of file`)
    text: str
    old_no: int | None = None
    new_no: int | None = None


@dataclass
class DiffHunk:
    header: str
    section: str
    lines: list[DiffLine] = field(default_factory=list)


@dataclass
class DiffFile:
    old_path: str = ""
    new_path: str = ""
    hunks: list[DiffHunk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # mode changes, renames, binary
    added: int = 0
    removed: int = 0

    @property
    def path(self) -> str:
        return self.old_path if self.new_path in ("", "/dev/null") else self.new_path

    @property
    def status(self) -> str:
        # git says so in an extended header line when there are no ---/+++ lines (binary).
        if self.old_path == "/dev/null" or any(n.startswith("new file") for n in self.notes):
            return "added"
        if self.new_path == "/dev/null" or any(n.startswith("deleted file") for n in self.notes):
            return "deleted"
        if self.old_path and self.new_path and self.old_path != self.new_path:
            return "renamed"
        return "modified"


@dataclass
class Diff:
    files: list[DiffFile]
    preamble: str = ""  # what came before the first file (a format-patch mail header)
    truncated: bool = False

    @property
    def added(self) -> int:
        return sum(f.added for f in self.files)

    @property
    def removed(self) -> int:
        return sum(f.removed for f in self.files)


def _diff_path(raw: str) -> str:
    path = raw.split("\t", 1)[0].strip()
    if path.startswith('"') and path.endswith('"'):
        path = path[1:-1]
    return path[2:] if path.startswith(("a/", "b/")) else path


def parse_unified_diff(text: str) -> Diff:
    """Files, hunks and numbered lines of a unified diff.

    Hunk line counts decide where a hunk ends, so a removed line that itself
    starts with `-- ` is not taken for the next file's `--- ` header.
    """
    diff = Diff(files=[])
    preamble: list[str] = []
    current: DiffFile | None = None
    hunk: DiffHunk | None = None
    old_no = new_no = old_left = new_left = 0
    shown = 0
    for line in text.splitlines():
        if hunk is not None and (old_left > 0 or new_left > 0):
            tag = line[:1]
            if tag in ("+", "-", " ", ""):
                shown += 1
                if shown > MAX_DIFF_LINES:
                    diff.truncated = True
                    break
            if tag == "+":
                hunk.lines.append(DiffLine("add", line[1:], None, new_no))
                new_no, new_left = new_no + 1, new_left - 1
                current.added += 1
                continue
            if tag == "-":
                hunk.lines.append(DiffLine("del", line[1:], old_no, None))
                old_no, old_left = old_no + 1, old_left - 1
                current.removed += 1
                continue
            if tag in (" ", ""):  # some tools strip the space of an empty context line
                hunk.lines.append(DiffLine("context", line[1:], old_no, new_no))
                old_no, new_no = old_no + 1, new_no + 1
                old_left, new_left = old_left - 1, new_left - 1
                continue
        if line.startswith("\\") and hunk is not None:
            hunk.lines.append(DiffLine("note", line[1:].strip()))
            continue
        if line.startswith("diff --git "):
            current, hunk = DiffFile(), None
            diff.files.append(current)
            a, sep, b = line[len("diff --git ") :].rpartition(" b/")
            if sep:
                current.old_path, current.new_path = _diff_path(a), b
            continue
        if line.startswith("--- ") and (current is None or current.hunks or current.old_path):
            if current is None or current.hunks:
                current, hunk = DiffFile(), None  # plain `diff -u`: no `diff --git` line
                diff.files.append(current)
            current.old_path = _diff_path(line[4:])
            continue
        if line.startswith("+++ ") and current is not None and not current.hunks:
            current.new_path = _diff_path(line[4:])
            continue
        match = _HUNK.match(line)
        if match:
            if current is None:
                current = DiffFile()
                diff.files.append(current)
            old_no, new_no = int(match[1]), int(match[3])
            old_left = int(match[2]) if match[2] is not None else 1
            new_left = int(match[4]) if match[4] is not None else 1
            hunk = DiffHunk(line.split(" @@", 1)[0] + " @@", match[5])
            current.hunks.append(hunk)
            continue
        if current is None:
            preamble.append(line)
        elif not current.hunks and line.strip():
            current.notes.append(line)  # index, mode, rename and "Binary files" lines
    diff.preamble = "\n".join(preamble).strip("\n")
    return diff


def diff_texts(old: str, new: str, old_label: str, new_label: str) -> Diff:
    """Two texts (a same-named artifact of two runs) as a parsed unified diff."""
    lines = difflib.unified_diff(
        old.splitlines(), new.splitlines(), old_label, new_label, lineterm="", n=3
    )
    return parse_unified_diff("\n".join(lines))
