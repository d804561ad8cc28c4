"""`POST /api/metrics/record`: run metrics, from request bodies to rows in `runs_runmetric`.

Two halves share one judge (`judge`), so an item the request counted as accepted
is exactly an item the worker stores:

* the request (`parse_metrics`) judges every item and checks its run ids exist;
  the pipeline spools the body as an IngestBatch of kind `metrics`;
* the worker (`store_metrics_batch`) judges the spooled body again, prices token
  metrics, writes every point with one `COPY` and adds to the runs' counters
  (`Run.objects.add_usage`), in the transaction that marks the batch done.

Standard names (GitTinkerer's `run_metrics`, Code Buddy's provider metrics) get
their unit from `STANDARD_UNITS`; every other name is a custom metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from django.utils import timezone

from portal.db import copy_text
from portal.http import BodyError
from runs.batches import MAX_TOKENS
from runs.models import (
    ModelPrice,
    PriceBook,
    Project,
    Run,
    RunUsage,
    run_id_problem,
)
from runs.timestamps import TimestampError, parse_timestamp
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.ingest.redaction import REDACTED, is_secret_key, redact_text
from telemetry.models import IngestBatch

# name -> unit. `tokens_used` is GitTinkerer's total (input and output together).
STANDARD_UNITS = {
    "duration_ms": "ms",
    "exit_code": "",
    "tokens_used": "tokens",
    "tokens_in": "tokens",
    "tokens_out": "tokens",
    "files_changed": "files",
    "cost_usd": "USD",
}
# Standard metrics that count something: a negative value is a client bug.
NON_NEGATIVE = frozenset(STANDARD_UNITS) - {"exit_code"}
MAX_NAME = 200
MAX_UNIT = 32
MAX_LABELS = 64
MAX_LABEL_KEY = 100
MAX_LABEL_VALUE = 200
MAX_ITEMS = 50_000
MAX_COST = 10**7  # one point; Run.cost_usd holds up to 10^8


class MetricError(ValueError):
    """One item is refused; the message names the field."""


@dataclass(slots=True)
class Metric:
    name: str
    value: float
    unit: str
    labels: dict[str, str]
    recorded_at: datetime
    run_id: str  # the client's run id; "" for a fleet metric (no run)
    run_pk: int | None = field(default=None)


def _clean(text: str) -> str:
    # PostgreSQL refuses NUL in text and JSONB: drop it rather than the item.
    return text.replace("\x00", "") if "\x00" in text else text


def _first(obj: dict, *keys: str) -> Any:
    """The first of several accepted spellings (GitTinkerer's, then the short one)."""
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return value
    return None


def _value(raw: Any) -> float:
    if isinstance(raw, bool):
        raise MetricError("metric_value: must be a number, not a boolean")
    if isinstance(raw, (int, float)):
        try:
            value = float(raw)
        except OverflowError:
            raise MetricError("metric_value: out of range") from None
    elif isinstance(raw, str) and len(raw) <= 64:
        # Shell emitters (`record_metric tokens_used 1250`) often quote their numbers.
        try:
            value = float(raw.strip())
        except ValueError:
            raise MetricError("metric_value: not a number") from None
    elif raw is None:
        raise MetricError("metric_value: required")
    else:
        raise MetricError("metric_value: must be a number")
    if not math.isfinite(value):
        raise MetricError("metric_value: must be finite (no NaN or infinity)")
    return value


def _labels(raw: Any) -> dict[str, str]:
    """Labels as a flat object of strings: numbers and booleans are written as text."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MetricError("labels: must be a JSON object")
    if len(raw) > MAX_LABELS:
        raise MetricError(f"labels: more than {MAX_LABELS} keys")
    labels: dict[str, str] = {}
    for key, value in raw.items():
        key = _clean(key)
        if not key or len(key) > MAX_LABEL_KEY:
            raise MetricError(f"labels: keys must be 1 to {MAX_LABEL_KEY} characters")
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            value = str(value)
        elif isinstance(value, float):
            value = repr(value) if math.isfinite(value) else str(value)
        elif not isinstance(value, str):
            raise MetricError(f"labels.{key[:40]}: must be a string, number or boolean")
        if len(value) > MAX_LABEL_VALUE:
            raise MetricError(f"labels.{key[:40]}: longer than {MAX_LABEL_VALUE} characters")
        # Secrets never reach the database, here as in event data.
        labels[key] = REDACTED if value and _secret_key(key) else _safe_value(value)
    return labels


# Label keys and values repeat from point to point (model, host, tool names): each
# distinct one is tested once, not once per point. Values are short, so the caches are small.
@lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    return is_secret_key(key)


@lru_cache(maxsize=16384)
def _safe_value(value: str) -> str:
    return redact_text(_clean(value))


def judge(obj: Any, default_at: datetime) -> Metric:
    """Judge one metric item: `{run_id?, metric_name, metric_value, recorded_at?, labels?,
    unit?}` (also `name`, `value`, `timestamp`). Raises MetricError naming the field.

    `default_at` is the time of the request, for items without `recorded_at`: the
    request and the worker must judge alike, so the worker passes the batch's
    `received_at`, not its own clock.
    """
    if not isinstance(obj, dict):
        raise MetricError("item must be a JSON object")
    name = obj.get("metric_name")
    if name is None:
        name = obj.get("name")
    if not isinstance(name, str) or not (name := _clean(name).strip()):
        raise MetricError("metric_name: required non-empty string")
    if len(name) > MAX_NAME:
        raise MetricError(f"metric_name: longer than {MAX_NAME} characters")
    value = obj.get("metric_value")
    if type(value) is float or type(value) is int:  # the common case, judged inline
        if not math.isfinite(value):
            raise MetricError("metric_value: must be finite (no NaN or infinity)")
        value = float(value)
    else:
        value = _value(_first(obj, "metric_value", "value"))
    if name in NON_NEGATIVE and value < 0:
        raise MetricError(f"metric_value: {name} must not be negative")
    if name == "cost_usd" and value >= MAX_COST:
        raise MetricError(f"metric_value: cost_usd must be below {MAX_COST}")
    at = _first(obj, "recorded_at", "timestamp")
    if at is None:
        recorded_at = default_at
    else:
        try:
            recorded_at = parse_timestamp(at, "recorded_at")
        except TimestampError as exc:
            raise MetricError(str(exc)) from None
    unit = obj.get("unit")
    if unit is None:
        unit = STANDARD_UNITS.get(name, "")
    elif not isinstance(unit, str):
        raise MetricError("unit: must be a string")
    elif len(unit) > MAX_UNIT:
        raise MetricError(f"unit: longer than {MAX_UNIT} characters")
    run_id = obj.get("run_id")
    if run_id is None:
        run_id = ""
    elif isinstance(run_id, int) and not isinstance(run_id, bool):
        run_id = str(run_id)
    elif not isinstance(run_id, str):
        raise MetricError("run_id: must be a string")
    if run_id and (problem := run_id_problem(run_id)):
        raise MetricError(f"run_id: {problem}")
    if "\x00" in run_id:  # not dropped like elsewhere: it would name another run
        raise MetricError("run_id: must not contain NUL characters")
    return Metric(name, value, _clean(unit), _labels(obj.get("labels")), recorded_at, run_id)


def body_items(body: bytes) -> list:
    """The items of a body: one item, `{"metrics": [...]}`, or a JSON array."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, f"body is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "metrics" in data:
        data = data["metrics"]
        if not isinstance(data, list):
            raise BodyError(400, '"metrics" must be a JSON array of metric items')
    elif isinstance(data, dict):
        data = [data]
    elif not isinstance(data, list):
        raise BodyError(400, 'body must be a metric object, {"metrics": [...]} or an array')
    if not data:
        raise BodyError(400, "no metrics in the body")
    if len(data) > MAX_ITEMS:
        raise BodyError(413, f"more than {MAX_ITEMS} metrics in one request: split it")
    return data


def judge_all(
    items: list, default_at: datetime, max_errors: int = 100
) -> tuple[dict[int, Metric], list[dict], int]:
    """Judge every item: (good items by index, reported errors, rejected count)."""
    good: dict[int, Metric] = {}
    errors: list[dict] = []
    rejected = 0
    for index, item in enumerate(items):
        try:
            good[index] = judge(item, default_at)
        except MetricError as exc:
            rejected += 1
            if len(errors) < max_errors:
                errors.append({"index": index, "error": str(exc)[:300]})
    return good, errors, rejected


def run_pks(project: Project, run_ids: set[str], lock: bool = False) -> dict[str, int]:
    """run_id -> Run.pk for the project's runs among `run_ids`; locked (in id order,
    as every receiver locks runs) when the worker adds to their counters."""
    if lock:
        return {run_id: run.pk for run_id, run in Run.objects.locked(project, run_ids).items()}
    return Run.objects.ids_by_run_id(project, run_ids)


def parse_metrics(
    project: Project, body: bytes, received_at: datetime, max_errors: int = 100
) -> tuple[int, int, list[dict], list[int]]:
    """The request's half: (accepted, rejected, errors, indexes refused for an unknown run).

    A run id must name a run of this project already (its events, a heartbeat or
    an artifact created it); an item without one is a fleet metric.
    """
    good, errors, rejected = judge_all(body_items(body), received_at, max_errors)
    known = run_pks(project, {m.run_id for m in good.values() if m.run_id})
    unknown = [i for i, m in good.items() if m.run_id and m.run_id not in known]
    for index in unknown:
        rejected += 1
        errors.append({"index": index, "error": "run_id: no such run in this project"})
    errors.sort(key=lambda e: e["index"])
    del errors[max_errors:]
    return len(good) - len(unknown), rejected, errors, unknown


# --- Worker side --------------------------------------------------------------


def computed_costs(metrics: list[Metric], book: PriceBook | None = None) -> list[Metric]:
    """`cost_usd` points for the token metrics that name their `model`.

    tokens_in and tokens_out of the same run, model and time are priced together
    (one call: one cost point) at the price valid at that time. A run for which
    the request carries its own cost_usd is not priced: the client's cost wins.
    Unknown models and times before any price give no cost.
    """
    client_costs = {m.run_id for m in metrics if m.name == "cost_usd"}
    calls: dict[tuple[str, str, datetime], list[Metric]] = {}
    for m in metrics:
        if m.name in ("tokens_in", "tokens_out") and m.run_id not in client_costs:
            model = m.labels.get("model")
            if model:
                calls.setdefault((m.run_id, model, m.recorded_at), []).append(m)
    if not calls:
        return []
    book = book or ModelPrice.objects.book()
    costs = []
    for (_run_id, model, at), points in calls.items():
        tokens_in = sum(_tokens(p.value) for p in points if p.name == "tokens_in")
        tokens_out = sum(_tokens(p.value) for p in points if p.name == "tokens_out")
        cost = book.cost(model, tokens_in, tokens_out, at)
        if cost is None:
            continue
        first = points[0]
        costs.append(
            Metric(
                "cost_usd",
                float(cost),
                "USD",
                {**first.labels, "computed": "true"},
                at,
                first.run_id,
                first.run_pk,
            )
        )
    return costs


def _tokens(value: float) -> int:
    return min(int(round(value)), MAX_TOKENS)


COPY_METRICS = (
    "COPY runs_runmetric (project_id, run_id, name, value, unit, labels, recorded_at, source)"
    " FROM STDIN"
)


def copy_rows(project_id: int, metrics: list[Metric], source: str = "api") -> bytes:
    """The points as PostgreSQL COPY text, built in one buffer."""
    lines = []
    for m in metrics:
        run = "\\N" if m.run_pk is None else m.run_pk
        labels = orjson.dumps(m.labels).decode().replace("\\", "\\\\")
        lines.append(
            f"{project_id}\t{run}\t{copy_text(m.name)}\t{m.value!r}\t{copy_text(m.unit)}"
            f"\t{labels}\t{m.recorded_at.isoformat()}\t{source}\n"
        )
    return "".join(lines).encode()


def run_usage(metrics: list[Metric]) -> dict[int, RunUsage]:
    """What the batch adds to each run; the last duration_ms/exit_code of a run counts."""
    by_run: dict[int, RunUsage] = {}
    for m in metrics:
        if m.run_pk is None:
            continue
        if m.name == "tokens_in":
            by_run.setdefault(m.run_pk, RunUsage()).tokens_in += _tokens(m.value)
        elif m.name == "tokens_out":
            by_run.setdefault(m.run_pk, RunUsage()).tokens_out += _tokens(m.value)
        elif m.name == "cost_usd":
            cost = Decimal(repr(m.value)).quantize(Decimal("0.000001"))
            by_run.setdefault(m.run_pk, RunUsage()).cost_usd += cost
        elif m.name == "duration_ms" and m.value < 2**62:
            by_run.setdefault(m.run_pk, RunUsage()).duration_ms = int(m.value)
        elif m.name == "exit_code" and m.value.is_integer() and -(2**31) <= m.value < 2**31:
            by_run.setdefault(m.run_pk, RunUsage()).exit_code = int(m.value)
    return by_run


def store_metrics(project: Project, metrics: list[Metric], book: PriceBook | None = None) -> int:
    """Price token metrics, COPY every point, add to the runs' counters.

    Must run inside a transaction (the caller commits it with the batch state).
    Metrics must carry `run_pk` (or None for fleet metrics).
    """
    metrics = metrics + computed_costs(metrics, book)
    if not metrics:
        return 0
    with connection.cursor() as cursor, cursor.copy(COPY_METRICS) as copy:
        copy.write(copy_rows(project.pk, metrics))
    Run.objects.add_usage(run_usage(metrics))
    return len(metrics)


def store_metrics_batch(batch, body: bytes) -> int:
    """Store a spooled `POST /api/metrics/record` body; returns the points stored.

    Judges the body again with the request's rules and its time, and skips the
    items the request refused for an unknown run (even if that run exists now: the
    client was told they were rejected). A run deleted since the request leaves
    its metrics as fleet metrics, as pruning does.
    """
    good, _, _ = judge_all(body_items(body), batch.received_at)
    for index in batch.params.get("unknown_runs", []):
        good.pop(index, None)
    metrics = list(good.values())
    pks = run_pks(batch.project, {m.run_id for m in metrics if m.run_id}, lock=True)
    for m in metrics:
        m.run_pk = pks.get(m.run_id) if m.run_id else None
    return store_metrics(batch.project, metrics)


class MetricsReceiver(Receiver):
    kind = IngestBatch.Kind.METRICS
    idempotency_prefix = "metrics:"

    def max_bytes(self) -> int:
        return settings.INGEST_MAX_BYTES

    def check(self, request: HttpRequest) -> None:
        content_type = request.content_type or "application/json"
        if content_type not in CONTENT_TYPES:
            raise Refusal(415, f"unsupported Content-Type {content_type!r}: send application/json")
        # The time of items that carry none: the worker judges with the request's clock.
        request.received_at = timezone.now()

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        if not body.strip():
            raise Refusal(400, 'empty body: send a metric object or {"metrics": [...]}')
        accepted, rejected, errors, unknown = parse_metrics(
            project, body, request.received_at, settings.INGEST_MAX_ERRORS_REPORTED
        )
        summary = {"accepted": accepted, "rejected": rejected, "errors": errors}
        return Verdict(accepted, summary, {"unknown_runs": unknown} if unknown else {})

    def store(self, batch: IngestBatch, body: bytes) -> int:
        return store_metrics_batch(batch, body)


CONTENT_TYPES = {"application/json", "text/plain"}
receiver = MetricsReceiver()
