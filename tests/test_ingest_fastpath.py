"""The msgspec shortcut and the body scan change nothing but speed.

Most lines are read by `_fast_record` (msgspec, data kept as JSON) and the worker
picks the lines scrub must walk with one RE2 scan of the whole body. The
reference is what every line went through before: `normalize(orjson.loads(line))`,
the lenient parser where orjson refuses, and scrub's search of the raw line.
These tests compare the two on a corpus of ordinary, hostile and randomly broken
lines: same verdicts, same error messages, same records, same stored data.
"""

from __future__ import annotations

import contextlib
import json
import random

import orjson
import pytest

import telemetry.ingest.records as records_module
from runs.timestamps import TimestampError, parse_timestamp
from telemetry.ingest import redaction, store
from telemetry.ingest.records import LineError, Record, judge_body, normalize, parse_body, scrub

BASE = {
    "ts": "2026-04-21T05:00:01.945+00:00",
    "slug": "octocat__hello-world",
    "phase": "WORKING",
    "level": "info",
    "event": "tool.bash",
    "data": {"command": "pytest -q", "exit_code": 0, "duration_ms": 812, "score": 0.955},
    "run_id": "4be03db0-dc25-44bd-b940-67edfe175330",
    "seq": 8,
}

# Values of every kind for any field: wrong types, bounds, escapes, huge numbers.
ODD_VALUES = [
    None,
    True,
    0,
    -1,
    1.0,
    2**63,
    2**63 - 1,
    2**64,
    -(2**63) - 1,
    "",
    " ",
    "x" * 201,
    "x" * 65,
    "x" * 129,
    "INFO",
    "Warning",
    "loud",
    "\u0000",
    "\ud800",
    "é",
    "a\tb",
    "2026-04-21T05:00:00Z",
    "yesterday",
    "0",
    1_700_000_000,
    1_700_000_000_000,
    1e400,
    [],
    {},
    {"password": "hunter2"},
    {"n": 2**70},
]

# Raw JSON fragments json.dumps cannot write: numbers and strings as clients send them.
ODD_FRAGMENTS = [
    b"1e400",
    b"-1E+0400",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551615",
    b"1.0000000000000000000001",
    b"NaN",
    b"Infinity",
    b"-0",
    b"1E2",
    b"01",
    b"1.",
    b".5",
    b'"\\ud800"',
    b'"\\uDC00x"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"\\u0041"',
    b'"\\u0001"',
    b'"tab\there"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b'"\xef\xbf\xbd"',
    b"[" * 40 + b"]" * 40,
    b"[" * 300 + b"]" * 300,
    b"[" * 1100 + b"]" * 1100,
    b'{"a":1,"a":2}',
    b"{'a':1}",
    b"[1,]",
    b'"https://user:pass@example.com"',
    b'"Bearer abc.def"',
]

BYTES = b'{}[]",:\\ 0123456789eE+-.tfnul\x00\xff\t\nabc'


def line_of(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def corpus(seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    lines = [line_of(BASE), line_of({"event": "x"}), b'{"event":"x","data":null}']
    for key in [*BASE, "message", "pid", "host", "request_id", "trace_id", "span_id", "extra"]:
        for value in ODD_VALUES:
            lines.append(line_of({**BASE, key: value}))
            lines.append(line_of({**BASE, "data": {**BASE["data"], key: value}}))
    for fragment in ODD_FRAGMENTS:
        for key in ("data", "event", "ts", "seq", "message", "extra"):
            lines.append(
                line_of(BASE).replace(
                    b'"run_id"', b'"' + key.encode() + b'":' + fragment + b',"run_id"', 1
                )
            )
        lines.append(line_of(BASE).replace(b'"score":0.955', b'"score":' + fragment))
    # Keys written with escapes, duplicated, or in another case.
    lines += [
        b'{"ev\\u0065nt":"x","d\\u0061ta":{"p\\u0061ssword":"s"}}',
        b'{"event":"x","event":"y","data":{},"data":{"a":1}}',
        b'{"Event":"x"}',
        b'  {"event":"x"}  ',
        b"null",
        b'"event"',
    ]
    # Random damage to good lines: a few bytes replaced, inserted or deleted.
    good = line_of(BASE)
    for _ in range(4000):
        line = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(line))
            action = rng.random()
            if action < 0.4:
                line[at] = rng.choice(BYTES)
            elif action < 0.7:
                line.insert(at, rng.choice(BYTES))
            else:
                del line[at]
        lines.append(bytes(line).replace(b"\n", b" "))
    # A body that starts with `[` is one JSON array, not lines: not this test's subject.
    return [line for line in lines if not line.lstrip().startswith(b"[")]


def reference(line: bytes, default_run_id: str = "") -> Record:
    """How every line was read before the shortcut: orjson, else the lenient parser."""
    try:
        return normalize(orjson.loads(line), default_run_id)
    except orjson.JSONDecodeError:
        record = normalize(json.loads(line.decode("utf-8", "replace")), default_run_id)
        record.lenient = True
        return record


def verdict(read, line: bytes) -> tuple:
    try:
        record = read(line)
    except (LineError, ValueError, RecursionError) as exc:
        return ("rejected", str(exc) if isinstance(exc, LineError) else "invalid JSON")
    return ("accepted", record.run_id)


def as_stored(record: Record) -> tuple:
    """What COPY writes of a record. Data kept as JSON is written as it came, so
    it must be JSON that orjson reads (as PostgreSQL's reading is checked below)."""
    return (
        record.ts,
        record.event,
        record.level,
        record.slug,
        record.phase,
        orjson.loads(record.data_json) if record.data is None else record.data,
        record.run_id,
        record.seq,
        record.message,
        record.pid,
        record.host,
        record.request_id,
        record.trace_id,
        record.span_id,
        record.truncated,
    )


LINES = corpus()


def test_the_corpus_exercises_both_paths_and_both_verdicts():
    fast = [line for line in LINES if records_module._fast_record(line.strip(), "") is not None]
    accepted = [line for line in LINES if verdict(reference, line)[0] == "accepted"]
    assert 500 < len(fast) < len(accepted) < len(LINES)


def test_the_shortcut_reads_every_line_it_takes_as_the_reference_does():
    taken = 0
    for line in LINES:
        record = records_module._fast_record(line.strip(), "default-run")
        if record is None:
            continue
        expected = reference(line.strip(), "default-run")
        # Lines only the lenient parser reads (huge numbers, broken UTF-8 in data)
        # are accepted alike; the worker reads those the slow way (see below).
        if not expected.lenient:
            assert as_stored(record) == as_stored(expected), line
            taken += 1
    assert taken > 500


def test_the_request_judges_every_line_as_the_reference_does():
    for line in LINES:
        accepted, rejected, errors = judge_body(line, "r")
        expected = verdict(lambda raw: reference(raw.strip(), "r"), line)
        if expected[0] == "accepted":
            assert (accepted, rejected) == (1, 0), (line, errors)
        else:
            assert (accepted, rejected) == (0, 1), line
            message = errors[0]["error"]
            assert message == expected[1] or (
                expected[1] == "invalid JSON" and message.startswith("invalid JSON")
            ), (line, message, expected)


def valid_utf8(line: bytes) -> bool:
    try:
        line.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("which", ["valid UTF-8 body", "body with broken UTF-8"])
def test_the_worker_stores_every_line_as_the_reference_does(which):
    lines = [line for line in LINES if valid_utf8(line)] if which == "valid UTF-8 body" else LINES
    pairs, rejected, _ = parse_body(b"\n".join(lines), "r")
    expected_pairs = []
    for line in lines:
        with contextlib.suppress(LineError, ValueError, RecursionError):
            expected_pairs.append((line.strip(), reference(line.strip(), "r")))
    assert len(pairs) == len(expected_pairs) and rejected == len(lines) - len(pairs)
    kept_as_json = 0
    for (raw, record), (expected_raw, expected) in zip(pairs, expected_pairs, strict=True):
        assert raw == expected_raw
        kept_as_json += record.data is None
        scrub(raw, record)
        scrub(expected_raw, expected)
        assert as_stored(record) == as_stored(expected), raw
    assert (kept_as_json > 500) == (which == "valid UTF-8 body")


def test_postgresql_reads_data_kept_as_json_as_it_reads_the_parsed_data(db):
    from django.db import connection

    pairs, _, _ = parse_body(b"\n".join(line for line in LINES if valid_utf8(line)), "r")
    kept = [(raw, record) for raw, record in pairs if record.data is None]
    as_sent = [record.data_json.decode() for _, record in kept]
    parsed = [orjson.dumps(reference(raw).data).decode() for raw, _ in kept]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE a::jsonb = b::jsonb), count(*)"
            " FROM unnest(%s::text[], %s::text[]) AS t(a, b)",
            [as_sent, parsed],
        )
        assert cursor.fetchone() == (len(kept), len(kept))
    assert len(kept) > 500


@pytest.mark.parametrize("seed", range(3))
def test_the_body_scan_finds_every_line_the_line_search_finds(seed):
    rng = random.Random(seed)
    words = [
        b"password",
        b"Passwd",
        b"pwd",
        b"SECRET",
        b'token"',
        b"api_key",
        b"apikey",
        b"private_key",
        b"credentials",
        b"Authorization",
        b"cookie",
        b"Bearer ",
        b"basic",
        b"https://u:p@h",
        b"https:\\/\\/u:p@h",
        b"git://x@y",
        b"ghp_",
        b"sk-",
        b"\\u0041",
        b"\\u0000",
        b"\\ud800",
        b"\xef\xbf\xbd",
        b"://a\x0bb@",
        b"://a b@",
        b"tokens",
        b"desk",
        b"abc",
        b"{" * 17,
        b"[" * 16,
        b"{[" * 8,
    ]
    lines = [b" ".join(rng.choices(words, k=rng.randint(0, 3))) for _ in range(3000)]
    body = b"\n".join(lines)
    found = {body.count(b"\n", 0, m.start()) for m in redaction.BODY_WALK_HINT.finditer(body)}
    for number, line in enumerate(lines):
        brackets = line.count(b"{") + line.count(b"[")
        if redaction.WALK_HINT.search(line.lower()) or brackets > redaction.MAX_DEPTH:
            assert number in found, line
        else:
            assert number not in found, line


TIMESTAMPS = [
    "2026-04-21T05:00:01.945+00:00",
    "2026-04-21T05:00:01Z",
    "2026-04-21 05:00:01.5+05:30",
    "2026-04-21T05:00:01.123456-15:59",
    "2026-04-21T23:59:59.999999+15:59",
    "2026-04-21T05:00:01.945+16:00",
    "2026-04-21T05:00:01.1234567+00:00",
    "2026-04-21T05:00:01,945+00:00",
    "2026-04-21T05:00:01",
    "2026-04-21T05:00",
    "2026-04-21",
    "20260421T050001Z",
    "2026-W17-2T05:00:01Z",
    "2026-04-21T05:00:01.945+00:00:30",
    "١٩٧٠-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
]


def test_timestamps_written_as_sent_are_the_instants_python_read(db):
    """copy_rows sends the client's text for plain ISO timestamps: PostgreSQL must
    read each as the same instant, and anything else must be written by isoformat."""
    from django.db import connection

    written, expected, records = [], [], []
    for text in TIMESTAMPS:
        try:
            ts = parse_timestamp(text)
        except TimestampError:
            continue
        line = line_of({**BASE, "ts": text})
        record = records_module._fast_record(line, "")
        assert record is not None and record.ts == ts and record.ts_text == text
        record.run = type("R", (), {"id": 1})()
        copied = store.copy_rows([record]).decode().split("\t")[1]
        assert copied == text or copied == ts.isoformat()
        written.append(copied)
        expected.append(ts)
        records.append(record)
    # A batch is tested at once when every timestamp is plain, else one by one.
    together = [row.split("\t")[1] for row in store.copy_rows(records).decode().splitlines()]
    assert together == written
    plain = [r for r, w in zip(records, written, strict=True) if w == r.ts_text]
    together = [row.split("\t")[1] for row in store.copy_rows(plain).decode().splitlines()]
    assert together == [r.ts_text for r in plain] and len(plain) > 4
    assert len(written) > 8 and any(
        w != e.isoformat() for w, e in zip(written, expected, strict=True)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT array_agg(t::timestamptz = e ORDER BY n)"
            " FROM unnest(%s::text[], %s::timestamptz[]) WITH ORDINALITY AS u(t, e, n)",
            [written, expected],
        )
        assert cursor.fetchone()[0] == [True] * len(written)
