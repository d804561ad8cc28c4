"""`manage.py ship`: trace files over real HTTP to a live portal, each line stored once."""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from runs.management.commands import ship
from runs.models import Event, Project, Run
from telemetry.models import IngestBatch
from tests.conftest import record

SLUG = "octocat__hello-world"
STEM = "2026-04-21T05:12:34.123+00:00"
RUN_ID = f"{SLUG}@{STEM}"


@pytest.fixture
def token(transactional_db) -> str:
    return Project.objects.create(name="Acme agents", slug="acme").create_token()


@pytest.fixture
def trace(tmp_path) -> Path:
    """A Gitoma log directory holding one run's trace file."""
    path = tmp_path / "logs" / SLUG / f"{STEM}.jsonl"
    path.parent.mkdir(parents=True)
    append(path, record("run.begin"), record("phase.start", data={"phase": "WORKING"}))
    return path


def append(path: Path, *lines: dict | str, end: str = "\n") -> None:
    with path.open("a") as fh:
        fh.write("".join((x if isinstance(x, str) else json.dumps(x)) + end for x in lines))


@pytest.fixture
def run_ship(live_server, token, tmp_path):
    """Ship paths to the live portal with one state file; returns (stdout, stderr)."""

    def run(*paths: Path, **options) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        options = {
            "url": live_server.url,
            "token": token,
            "state": str(tmp_path / "state.json"),
            **options,
        }
        call_command("ship", *map(str, paths), stdout=out, stderr=err, **options)
        return out.getvalue(), err.getvalue()

    return run


def stored(run_id: str = RUN_ID) -> list[str]:
    return list(
        Event.objects.filter(run__run_id=run_id).order_by("seq").values_list("event", flat=True)
    )


def test_it_ships_a_gitoma_directory_as_one_run_per_file(run_ship, trace):
    append(trace.parent / "2026-04-22T08:00:00.000+00:00.jsonl", record("run.begin"))
    other = trace.parent.parent / "acme__tools" / "2026-04-20T10:00:00.000+00:00.jsonl"
    other.parent.mkdir()
    append(other, record("run.begin", slug="acme__tools"), record("llm.call", slug="acme__tools"))

    out, err = run_ship(trace.parent.parent)

    assert stored() == ["run.begin", "phase.start"]
    assert stored(f"{SLUG}@2026-04-22T08:00:00.000+00:00") == ["run.begin"]
    assert stored("acme__tools@2026-04-20T10:00:00.000+00:00") == ["run.begin", "llm.call"]
    assert Run.objects.get(run_id=RUN_ID).slug == SLUG
    assert f"{trace} -> {RUN_ID}: 2 line(s) sent, 2 accepted, 0 rejected" in out
    assert err == ""


def test_it_sends_only_the_lines_appended_since_last_time(run_ship, trace):
    run_ship(trace)
    append(trace, record("llm.call"), record("git.commit"))
    out, _ = run_ship(trace)
    assert "2 line(s) sent, 2 accepted" in out
    assert stored() == ["run.begin", "phase.start", "llm.call", "git.commit"]
    assert IngestBatch.objects.count() == 2


def test_a_restart_with_the_same_state_file_sends_nothing(run_ship, trace, tmp_path):
    run_ship(trace)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["files"] == {
        f"{trace}:{trace.stat().st_ino}": {"offset": trace.stat().st_size, "line": 2}
    }
    out, _ = run_ship(trace)
    assert "0 line(s) sent" in out
    assert IngestBatch.objects.count() == 1
    assert len(stored()) == 2


def test_a_lost_state_file_stores_nothing_twice_thanks_to_idempotency_keys(
    run_ship, trace, tmp_path
):
    run_ship(trace)
    (tmp_path / "state.json").unlink()
    out, _ = run_ship(trace)
    assert "2 line(s) sent, 2 accepted" in out  # the portal replays its first answer
    assert stored() == ["run.begin", "phase.start"]
    assert IngestBatch.objects.count() == 1


def test_a_partial_last_line_waits_until_it_is_complete(run_ship, trace):
    half = json.dumps(record("git.commit"))
    append(trace, half[:20], end="")
    run_ship(trace)
    assert stored() == ["run.begin", "phase.start"]
    append(trace, half[20:])
    run_ship(trace)
    assert stored() == ["run.begin", "phase.start", "git.commit"]


def test_bad_lines_are_reported_and_good_ones_stored(run_ship, trace, monkeypatch):
    # Batches of two lines: the second batch is all bad (a 400), the others are mixed.
    monkeypatch.setattr(ship, "MAX_LINES", 2)
    append(trace, "not json", record("x.y", level="loud"), "{}", record("git.commit"), "")
    out, err = run_ship(trace)
    assert stored() == ["run.begin", "phase.start", "git.commit"]
    assert f"{trace}:3: invalid JSON" in err
    assert f"{trace}:4: level:" in err
    assert f"{trace}:5: event:" in err
    assert "6 line(s) sent, 3 accepted, 3 rejected" in out
    assert "0 line(s) sent" in run_ship(trace)[0]  # the bad batch is not sent again


def test_it_halves_batches_the_portal_finds_too_large(run_ship, trace, settings):
    line = json.dumps(record("llm.call", data={"pad": "x" * 100}))
    append(trace, *[line] * 6)
    settings.INGEST_MAX_BYTES = len(line) * 3  # the live server reads the same settings
    out, err = run_ship(trace)
    assert "8 line(s) sent, 8 accepted, 0 rejected" in out
    assert len(stored()) == 8
    assert IngestBatch.objects.count() == 4  # 8 lines, refused; 4, refused; then 2 at a time
    assert err == ""


def test_a_line_longer_than_a_batch_is_skipped_and_reported(run_ship, trace, monkeypatch):
    monkeypatch.setattr(ship, "MAX_BYTES", 400)
    append(trace, record("huge", data={"blob": "x" * 1000}), record("git.commit"))
    out, err = run_ship(trace)
    assert f"{trace}:3: line longer than 400 bytes, skipped" in err
    assert stored() == ["run.begin", "phase.start", "git.commit"]
    assert "3 line(s) sent, 3 accepted, 1 rejected" in out


def test_it_refuses_to_start_without_a_token(trace, tmp_path, monkeypatch):
    monkeypatch.delenv("RUNLENS_TOKEN", raising=False)
    with pytest.raises(CommandError, match="no ingest token"):
        call_command("ship", str(trace), state=str(tmp_path / "state.json"))


def test_it_reads_url_and_token_from_the_environment(
    live_server, token, trace, tmp_path, monkeypatch
):
    monkeypatch.setenv("RUNLENS_URL", live_server.url)
    monkeypatch.setenv("RUNLENS_TOKEN", token)
    call_command("ship", str(trace), state=str(tmp_path / "state.json"), stdout=io.StringIO())
    assert len(stored()) == 2


def test_a_refused_token_stops_without_moving_the_offset(run_ship, trace, tmp_path):
    with pytest.raises(CommandError, match="401"):
        run_ship(trace, token="rl_wrong")
    assert not (tmp_path / "state.json").exists()
    run_ship(trace)
    assert len(stored()) == 2


def test_an_unreachable_portal_fails_after_its_retries_and_keeps_the_offset(run_ship, trace):
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CommandError, match="after 2 attempt"):
        run_ship(trace, url=f"http://127.0.0.1:{port}", retries=2)
    run_ship(trace)
    assert len(stored()) == 2


class FlakyPortal(BaseHTTPRequestHandler):
    """A stand-in portal: 503 first, then 202; remembers what it was sent."""

    seen: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        first = len(self.seen) == 1
        answer = b"{}" if first else b'{"accepted": 2, "rejected": 0, "errors": [], "batch": 1}'
        self.send_response(503 if first else 202)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_it_retries_a_503_with_the_same_idempotency_key(trace, tmp_path, token):
    server = HTTPServer(("127.0.0.1", 0), FlakyPortal)
    FlakyPortal.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = io.StringIO()
        url = f"http://127.0.0.1:{server.server_port}"
        call_command(
            "ship", str(trace), url=url, token=token, state=str(tmp_path / "s"), stdout=out
        )
    finally:
        server.shutdown()
    first, second = FlakyPortal.seen
    assert first["headers"]["Idempotency-Key"] == second["headers"]["Idempotency-Key"]
    assert (
        first["path"]
        == "/api/ingest/events?run_id="
        + "octocat__hello-world%402026-04-21T05%3A12%3A34.123%2B00%3A00"
    )
    assert first["headers"]["Authorization"] == f"Bearer {token}"
    assert first["headers"]["Content-Type"] == "application/x-ndjson"
    assert first["headers"]["Content-Encoding"] == "gzip"
    assert gzip.decompress(second["body"]) == trace.read_bytes()
    assert "2 line(s) sent, 2 accepted" in out.getvalue()


def test_follow_picks_up_new_lines_and_new_files_until_ctrl_c(run_ship, trace, monkeypatch):
    later = trace.parent / "2026-04-22T08:00:00.000+00:00.jsonl"
    polls = []

    def meanwhile(seconds):
        # What the agent does between two polls; the second poll ends with Ctrl-C.
        polls.append(seconds)
        if len(polls) == 1:
            append(trace, record("run.exit_clean"))
            append(later, record("run.begin"))
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(ship, "sleep", meanwhile)
    out, _ = run_ship(trace.parent, follow=True)
    assert stored() == ["run.begin", "phase.start", "run.exit_clean"]
    assert stored(f"{SLUG}@{later.stem}") == ["run.begin"]
    assert out.rstrip().endswith("stopped; offsets saved")
    assert polls == [1.0, 1.0]


def test_shipped_events_are_what_logs_prints(run_ship, trace):
    append(trace, record("git.commit", phase="WORKING", data={"sha": "a1b2c3d"}))
    run_ship(trace.parent)
    out = io.StringIO()
    call_command("logs", SLUG, raw=True, stdout=out)
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert printed == [
        {**record("run.begin"), "ts": "2026-04-21T05:12:34.123+00:00"},
        record("phase.start", data={"phase": "WORKING"}),
        record("git.commit", phase="WORKING", data={"sha": "a1b2c3d"}),
    ]


def test_run_ids_come_from_the_file_and_fit_in_128_characters(tmp_path):
    assert ship.run_id_for(tmp_path / SLUG / f"{STEM}.jsonl") == RUN_ID
    assert ship.run_id_for(tmp_path / "traces" / "agent.jsonl") == "agent@agent"
    long = tmp_path / ("o" * 100 + "__" + "r" * 100) / f"{STEM}.jsonl"
    run_id = ship.run_id_for(long)
    assert len(run_id) == 128 and run_id == ship.run_id_for(long)
    assert run_id != ship.run_id_for(long.with_name("other.jsonl"))
