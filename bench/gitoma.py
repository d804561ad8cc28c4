"""Gitoma-shaped run events for the benchmarks: realistic, deterministic, self-contained.

Several agents run at once, so the stream interleaves their runs the way a log
shipper tailing `~/.gitoma/logs/*/*.jsonl` would send it. Each run goes through
Gitoma's phases (run.begin, ANALYZING, PLANNING, WORKING, PR_OPEN, DONE) and in
WORKING emits the bulk of the traffic: LLM calls, tool calls and git commits,
with some warnings and errors. A few records carry secrets, so the benchmark
also pays for redaction where a real stream would.

Records carry `run_id` and `seq` (optional fields of the ingest API): batches
of one run may be processed by two workers in any order, and explicit `seq`
keeps the stored rows identical across the benchmark's phases.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson

PHASES = ("ANALYZING", "PLANNING", "WORKING", "PR_OPEN", "DONE")
MODELS = ("claude-sonnet-4-5", "gpt-4.1", "qwen2.5-coder-32b", "gemini-2.5-pro")
_VOCABULARY = (
    "refactor parser handle empty config add tests update readme fix flaky retry "
    "timeout docs typing lint bump dependency cache invalidate migration schema"
)
WORDS = tuple(_VOCABULARY.split())
FILES = (
    "README.md",
    "src/app/main.py",
    "src/app/config.py",
    "src/app/cli.py",
    "tests/test_config.py",
    "tests/test_cli.py",
    "pyproject.toml",
    ".github/workflows/ci.yml",
    "docs/usage.md",
    "src/app/http/client.py",
)
ANALYZERS = ("readme", "tests", "ci", "deps", "types", "security", "docs")
COMMANDS = (
    "pytest -q tests/test_config.py",
    "ruff check src",
    "git status --porcelain",
    "python -m mypy src/app",
    "npm test -- --watch=false",
)


class _Agent:
    """One agent process: runs one Gitoma run after another on its repository."""

    def __init__(self, rng: random.Random, number: int):
        self.rng = rng
        self.slug = f"octocat{number}__{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        self.pid = rng.randrange(1000, 60000)
        self.events: Iterator[tuple[str, str, str, dict]] = iter(())
        self.run_id = ""
        self.seq = 0

    def next_record(self, ts: datetime) -> dict:
        step = next(self.events, None)
        if step is None:  # the run is over: start the next one
            self.run_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            self.seq = 0
            self.events = self._run()
            step = next(self.events)
        level, event, phase, data = step
        self.seq += 1
        record = {
            "ts": ts.isoformat(timespec="milliseconds"),
            "slug": self.slug,
            "phase": phase,
            "level": level,
            "event": event,
            "data": data,
            "run_id": self.run_id,
            "seq": self.seq,
        }
        if level == "error":
            record["message"] = f"{event} failed: {data.get('error', 'see data')}"
        return record

    def _run(self) -> Iterator[tuple[str, str, str, dict]]:
        rng = self.rng
        model = rng.choice(MODELS)
        yield (
            "info",
            "run.begin",
            "",
            {
                "command": "run",
                "repo_url": f"https://github.com/{self.slug.replace('__', '/')}",
                "branch": f"gitoma/{rng.choice(WORDS)}-{rng.randrange(1000)}",
                "model": model,
                "pid": self.pid,
                "gitoma_version": "0.9.3",
                "work_rig": f"rig-{rng.randrange(8)}",
                "dry_run": False,
            },
        )
        for phase in PHASES:
            yield "info", "phase.start", phase, {"phase": phase, "previous": "", "reason": "auto"}
            if phase == "ANALYZING":
                for name in rng.sample(ANALYZERS, 4):
                    yield from self._analyzer(phase, name)
            elif phase == "PLANNING":
                for _ in range(rng.randrange(2, 6)):
                    yield self._llm(phase, model, "plan")
            elif phase == "WORKING":
                # Most of a run: sized so runs are 200-2,000 events long.
                for subtask in range(rng.randrange(4, 40)):
                    yield from self._subtask(phase, model, f"s{subtask // 4}_{subtask % 4}")
            elif phase == "PR_OPEN":
                yield self._push(phase)
                number = rng.randrange(1, 5000)
                yield (
                    "info",
                    "pr.open",
                    phase,
                    {
                        "number": number,
                        "url": f"https://github.com/{self.slug.replace('__', '/')}/pull/{number}",
                        "title": " ".join(rng.choices(WORDS, k=6)),
                        "draft": False,
                        "commits": rng.randrange(1, 20),
                    },
                )
        yield (
            "info",
            "run.exit_clean",
            "DONE",
            {"exit_code": 0, "duration_s": rng.randrange(60, 3600)},
        )

    def _analyzer(self, phase: str, name: str) -> Iterator[tuple[str, str, str, dict]]:
        rng = self.rng
        yield "debug", "analyzer.start", phase, {"analyzer": name, "root": "/work/repo", "depth": 3}
        yield (
            "info",
            "analyzer.done",
            phase,
            {
                "analyzer": name,
                "files_scanned": rng.randrange(10, 900),
                "findings": rng.randrange(0, 30),
                "duration_ms": rng.randrange(5, 4000),
                "score": round(rng.random(), 3),
            },
        )

    def _llm(self, phase: str, model: str, purpose: str, subtask: str = "") -> tuple:
        rng = self.rng
        tokens_in, tokens_out = rng.randrange(500, 60000), rng.randrange(50, 4000)
        data: dict = {
            "model": model,
            "purpose": purpose,
            "subtask_id": subtask,
            "duration_ms": rng.randrange(300, 90000),
            "temperature": 0.2,
            "cost_usd": round(tokens_in * 3e-6 + tokens_out * 1.5e-5, 6),
            "finish_reason": rng.choice(("stop", "stop", "stop", "length", "tool_use")),
            "provider": model.split("-")[0],
            "response_id": f"msg_{rng.getrandbits(120):030x}",
            "ttft_ms": rng.randrange(150, 9000),
            "cache_read_tokens": rng.randrange(0, tokens_in),
            "attempt": 1,
        }
        if rng.random() < 0.3:  # some providers report an OpenAI-style usage object
            data["usage"] = {"prompt_tokens": tokens_in, "completion_tokens": tokens_out}
        else:
            data["tokens_in"], data["tokens_out"] = tokens_in, tokens_out
        return "info", "llm.call", phase, data

    def _subtask(self, phase: str, model: str, subtask: str) -> Iterator[tuple]:
        rng = self.rng
        yield (
            "info",
            "subtask.start",
            phase,
            {
                "subtask_id": subtask,
                "title": _title(rng),
                "description": " ".join(rng.choices(WORDS, k=rng.randrange(10, 30))),
                "files_hint": rng.sample(FILES, 2),
                "priority": rng.randrange(1, 4),
            },
        )
        for _ in range(rng.randrange(3, 14)):
            roll = rng.random()
            if roll < 0.35:
                yield self._llm(phase, model, "edit", subtask)
            elif roll < 0.42:
                yield (
                    "warn",
                    "llm.retry",
                    phase,
                    {
                        "model": model,
                        "attempt": rng.randrange(1, 4),
                        "reason": rng.choice(("rate_limited", "overloaded", "timeout")),
                        "retry_after_s": rng.randrange(1, 30),
                        "subtask_id": subtask,
                    },
                )
            else:
                yield self._tool(phase, subtask)
        files = rng.sample(FILES, rng.randrange(1, 5))
        yield (
            "info",
            "git.commit",
            phase,
            {
                "sha": f"{rng.getrandbits(160):040x}"[:12],
                "subtask_id": subtask,
                "files": files,
                "insertions": rng.randrange(1, 400),
                "deletions": rng.randrange(0, 200),
                "message": _title(rng),
                "author": "gitoma-bot <bot@gitoma.dev>",
                "branch": "gitoma/work",
                "signed": False,
            },
        )

    def _tool(self, phase: str, subtask: str) -> tuple:
        rng = self.rng
        kind = rng.choice(("read_file", "read_file", "edit", "bash", "grep", "list_dir"))
        data: dict = {
            "subtask_id": subtask,
            "tool_call_id": f"toolu_{rng.getrandbits(110):028x}",
            "duration_ms": rng.randrange(1, 20000),
            "ok": True,
        }
        level = "info"
        if kind in ("read_file", "edit", "list_dir"):
            data["path"] = rng.choice(FILES)
            data["bytes"] = rng.randrange(100, 90000)
            if kind == "edit":
                data["lines_added"], data["lines_removed"] = rng.randrange(60), rng.randrange(30)
        elif kind == "grep":
            data["pattern"] = rng.choice(WORDS)
            data["matches"] = rng.randrange(0, 80)
            data["paths"] = rng.sample(FILES, 3)
        else:
            data["cmd"] = rng.choice(COMMANDS)
            data["exit_code"] = 0 if rng.random() < 0.85 else 1
            data["stdout_tail"] = " ".join(rng.choices(WORDS, k=rng.randrange(4, 30)))
            if data["exit_code"]:
                level = "warn"
            if rng.random() < 0.01:
                # An agent that echoes its authenticated clone: redacted on ingest.
                token = "ghp_" + f"{rng.getrandbits(200):050x}"[:36]
                data["cmd"] = f"git clone https://x-access-token:{token}@github.com/o/r.git"
        if rng.random() < 0.012:
            level = "error"
            data["error"] = rng.choice(
                ("FileNotFoundError: no such file", "TimeoutExpired: 120s", "PermissionError")
            )
        return level, f"tool.{kind}", phase, data

    def _push(self, phase: str) -> tuple:
        return (
            "info",
            "git.push",
            phase,
            {"remote": "origin", "branch": "gitoma/work", "forced": False, "commits": 3},
        )


def _title(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randrange(3, 9))).capitalize()


def make_records(count: int, agents: int = 12, seed: int = 1) -> list[dict]:
    """`count` records from `agents` concurrent agents, in arrival order."""
    rng = random.Random(seed)
    pool = [_Agent(rng, number) for number in range(agents)]
    ts = datetime(2026, 4, 21, 5, 0, tzinfo=UTC)
    records = []
    for _ in range(count):
        ts += timedelta(milliseconds=rng.randrange(1, 40))
        records.append(rng.choice(pool).next_record(ts))
    return records


def ndjson(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)
