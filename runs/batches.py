"""What a batch of run events does to its runs: created if new, locked, counted (events,
levels, LLM tokens and cost, priced from ModelPrice when the agent sent none), its
lifecycle applied through Run's methods, saved once (RunQuerySet.save_batch).

The events store (telemetry/ingest/store.py) drives it; every record of a batch goes
through `RunTally.apply`, hence its plain shape.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation

from runs.ids import uuid7
from runs.models import (
    SESSION_END_EVENTS,
    TERMINAL_PHASES,
    ModelPrice,
    PriceBook,
    Project,
    Run,
)

MAX_TOKENS = 2**40  # per call or point: anything larger is not a token count
MAX_CALL_COST = Decimal(10**7)
_TOKENS_IN = ("tokens_in", "input_tokens", "prompt_tokens")
_TOKENS_OUT = ("tokens_out", "output_tokens", "completion_tokens")
_NO_USAGE: dict = {}


def _first_count(data: dict, usage: dict, keys: tuple[str, str, str]) -> int:
    """The first count found under `keys`, in `data` then in `usage`."""
    a, b, c = keys
    for value in (data.get(a), data.get(b), data.get(c), usage.get(a), usage.get(b), usage.get(c)):
        # type() is: bool (an int subclass) is not a count.
        if type(value) is int and value >= 0:
            return value if value < MAX_TOKENS else MAX_TOKENS
    return 0


def llm_usage(data: dict) -> tuple[int, int, Decimal | None]:
    """Tokens in/out and the agent's own cost of an `llm.call` record (flat fields or
    a `usage` object); the cost is None when the agent sent none."""
    usage = data.get("usage")
    if type(usage) is not dict:
        usage = _NO_USAGE
    tokens_in = _first_count(data, usage, _TOKENS_IN)
    tokens_out = _first_count(data, usage, _TOKENS_OUT)
    raw_cost = data.get("cost_usd", usage.get("cost_usd"))
    kind = type(raw_cost)
    if kind is float or kind is int or kind is str:
        try:
            cost = Decimal(raw_cost if kind is str else repr(raw_cost))
        except InvalidOperation:
            return tokens_in, tokens_out, None
        if cost.is_finite() and 0 <= cost < MAX_CALL_COST:
            return tokens_in, tokens_out, cost
    return tokens_in, tokens_out, None


def _exit_code(data: dict) -> int | None:
    code = data.get("exit_code")
    return code if isinstance(code, int) and -(2**31) <= code < 2**31 else None


class RunTally:
    """What one batch of events changes on one run, applied in memory and saved once.

    `apply` runs for every record, hence its plain shape: counters first, then the
    lifecycle methods of Run, called only for the records that carry lifecycle.
    A record is anything with the Gitoma fields (`ts`, `event`, `level`, `slug`,
    `phase`, `pid`, `host`), a `fields(read_only)` accessor for its data and a
    `cost_usd` slot, which receives the computed cost of an unpriced `llm.call`.
    """

    __slots__ = ("run", "batch", "events", "errors", "warnings", "tokens_in", "tokens_out", "cost")

    def __init__(self, run: Run, batch: RunBatch):
        self.run = run
        self.batch = batch
        self.events = self.errors = self.warnings = self.tokens_in = self.tokens_out = 0
        self.cost = Decimal(0)

    def apply(self, rec) -> None:
        run = self.run
        self.events += 1
        level = rec.level
        if level == "error":
            self.errors += 1
        elif level == "warn":
            self.warnings += 1
        ts = rec.ts
        if run.last_event_at is None or ts > run.last_event_at:
            run.last_event_at = ts
        if run.started_at is None:
            run.started_at = ts
        if rec.slug and not run.slug:
            run.slug = rec.slug
        if rec.pid is not None:
            run.pid = rec.pid
            run.watched = True
        if rec.host:
            run.host = rec.host
        name = rec.event

        if name == "run.begin":
            parent = run.begin(ts, rec.fields(read_only=True))
            if parent:
                self.batch.parents[run.run_id] = parent
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
            run.exit_cleanly(ts, _exit_code(rec.fields(read_only=True)))
        elif name == "run.crashed":
            run.crash(ts, _exit_code(rec.fields(read_only=True)))
        elif name in SESSION_END_EVENTS:
            data = rec.fields(read_only=True)
            run.end_session(
                ts, failed=data.get("status") in ("error", "failed") or level == "error"
            )
        elif run.phase in TERMINAL_PHASES and run.status == _RUNNING:
            run.finish_in_phase(ts, _exit_code(rec.fields(read_only=True)))

        if name == "llm.call":
            self.count_llm_call(rec)

    def count_llm_call(self, rec) -> None:
        data = rec.fields(read_only=True)
        tokens_in, tokens_out, cost = llm_usage(data)
        if cost is None and (tokens_in or tokens_out):
            # The agent sent no cost: price the call at the price valid when it
            # happened. The price goes beside the agent's data, never into it.
            model = data.get("model")
            if isinstance(model, str):
                cost = self.batch.price(model, tokens_in, tokens_out, rec.ts)
                rec.cost_usd = cost
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        if cost is not None:
            self.cost += cost

    def add_counters(self) -> None:
        run = self.run
        run.events_count += self.events
        run.errors_count += self.errors
        run.warnings_count += self.warnings
        run.tokens_in += self.tokens_in
        run.tokens_out += self.tokens_out
        run.cost_usd += self.cost


_RUNNING, _ORPHANED = Run.Status.RUNNING, Run.Status.ORPHANED


class RunBatch:
    """The runs one batch of events writes: created if new, locked, tallied, saved.

    batch = RunBatch.open(project, records)   # every record gets .run
    for rec in records: batch.tallies[rec.run_id].apply(rec)
    batch.save()
    """

    def __init__(self, project: Project, runs: dict[str, Run]):
        self.project = project
        self.tallies = {run_id: RunTally(run, self) for run_id, run in runs.items()}
        self.parents: dict[str, str] = {}  # run_id -> run_id it was forked from
        self._prices: PriceBook | None = None

    @classmethod
    def open(cls, project: Project, records: list) -> RunBatch:
        """Give every record a run, creating runs as needed, locked for the batch.

        A record without `run_id` belongs to the newest running run of its slug;
        `run.begin` without a run_id opens a new one.
        """
        current: dict[str, str] = {}  # slug -> run_id, for records that name no run
        for rec in records:
            if rec.run_id:
                continue
            if rec.event == "run.begin" or rec.slug not in current:
                existing = None
                if rec.event != "run.begin":
                    existing = Run.objects.running_run_id(project, rec.slug)
                current[rec.slug] = existing or str(uuid7())
            rec.run_id = current[rec.slug]
        seeds: dict[str, dict] = {}  # the first record of each run names its slug
        for rec in records:
            if rec.run_id not in seeds:
                seeds[rec.run_id] = {"slug": rec.slug, "started_at": rec.ts}
        Run.objects.create_missing(project, seeds)
        batch = cls(project, Run.objects.locked(project, seeds))
        tallies = batch.tallies
        for rec in records:
            rec.run = tallies[rec.run_id].run
        return batch

    def price(self, model: str, tokens_in: int, tokens_out: int, at: datetime) -> Decimal | None:
        if self._prices is None:  # read once per batch, and only if a call needs it
            self._prices = ModelPrice.objects.book()
        return self._prices.cost(model, tokens_in, tokens_out, at)

    def save(self) -> None:
        for tally in self.tallies.values():
            tally.add_counters()
        if self.parents:  # fork lineage: the parent must be a run of the same project
            found = Run.objects.ids_by_run_id(self.project, set(self.parents.values()))
            for run_id, parent in self.parents.items():
                run = self.tallies[run_id].run
                if found.get(parent) and found[parent] != run.pk:
                    run.parent_id = found[parent]
        Run.objects.save_batch([tally.run for tally in self.tallies.values()])
