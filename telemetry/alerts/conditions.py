"""One function per alert condition: what is true now, read from the cheap tables.

Each returns the rule's findings, one per subject (the project, a slug, a run, an
error group). None reads `runs_event`: counts come from the per-minute tables the
worker keeps (EventCount, SlugErrorCount, RefusalCount), the rest from runs, error
groups and the spool's pending index, each bounded by the rule's project and
window. docs/alerts.md says what each condition means.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.db import connection
from django.db.models import Exists, Max, Min, OuterRef, Sum
from django.db.models.functions import Coalesce, Greatest
from django.urls import reverse

from runs.models import EventCount, Run
from telemetry.models import (
    AlertRule,
    Condition,
    ErrorGroup,
    ErrorReport,
    IngestBatch,
    RefusalCount,
    SlugErrorCount,
)

# How far back a one-off happening (a failed run) is looked for: a run whose failure
# reaches the portal later than this (a shipper offline for a day) is not alerted on.
EVENT_LOOKBACK = timedelta(hours=24)
BASELINE_HOURS = 7 * 24
# Hours of the baseline that must have seen activity before it is trusted.
BASELINE_MIN_HOURS = 24


@dataclass
class Finding:
    subject: str  # stable key of what fires: "project", "slug:<slug>", "run:<id>", "group:<id>"
    text: str  # one human line, for messages and the /alerts page
    value: float | None
    slug: str = ""
    path: str = ""  # the portal page of the subject


@dataclass(frozen=True)
class ConditionCheck:
    check: Callable[[AlertRule, datetime], list[Finding]]
    # State-like conditions send "resolved" when they clear; one-off happenings (a new
    # group, a failed run, a day's spend) do not: they never un-happen.
    resolves: bool


def _runs_path(rule: AlertRule, slug: str = "", **extra: str) -> str:
    query = {"project": rule.project.slug, **({"slug": slug} if slug else {}), **extra}
    return f"{reverse('runs:list')}?{urlencode(query)}"


def _subject(rule: AlertRule) -> tuple[str, str]:
    """The subject of a project-wide count: the slug when the rule names one."""
    return (f"slug:{rule.slug}", rule.slug) if rule.slug else ("project", rule.project.slug)


def _window_start(rule: AlertRule, now: datetime) -> datetime:
    return now - timedelta(minutes=rule.window_minutes or 1)


# --- Counts in a window ------------------------------------------------------------


def error_events(rule: AlertRule, now: datetime) -> list[Finding]:
    """Error-level events, plus browser and Sentry error reports, in the window."""
    start = _window_start(rule, now)
    if rule.slug:
        counts = SlugErrorCount.objects.filter(project=rule.project, slug=rule.slug)
        total = counts.filter(minute__gt=start, minute__lte=now).aggregate(n=Sum("errors"))["n"]
        total = total or 0
    else:
        counts = EventCount.objects.filter(project=rule.project, minute__gt=start, minute__lte=now)
        total = counts.aggregate(n=Sum("errors"))["n"] or 0
        # Error-level events became reports too (source "event"): counted once, above.
        total += (
            ErrorReport.objects.filter(project=rule.project, received_at__gt=start)
            .filter(received_at__lte=now)
            .exclude(source=ErrorReport.Source.EVENT)
            .count()
        )
    if total < (rule.threshold or 0) or total == 0:
        return []
    subject, who = _subject(rule)
    text = (
        f"{who}: {total} error events in {rule.window_minutes} min (threshold {rule.threshold:g})"
    )
    path = _runs_path(rule, rule.slug) if rule.slug else reverse("telemetry:errors")
    return [Finding(subject, text, total, rule.slug, path)]


def rate_limited(rule: AlertRule, now: datetime) -> list[Finding]:
    """Write requests of the project answered 429 in the window."""
    start = _window_start(rule, now)
    refusals = RefusalCount.objects.filter(project=rule.project, minute__gt=start, minute__lte=now)
    total = refusals.aggregate(n=Sum("refused"))["n"] or 0
    if total < (rule.threshold or 0) or total == 0:
        return []
    text = (
        f"{rule.project.slug}: {total} requests refused with 429 in {rule.window_minutes} min "
        f"(threshold {rule.threshold:g}); see the project's limits"
    )
    return [Finding("project", text, total, "", reverse("telemetry:status"))]


# --- Error groups ------------------------------------------------------------------


def _groups(rule: AlertRule):
    groups = ErrorGroup.objects.filter(project=rule.project)
    if rule.slug:
        reports = ErrorReport.objects.filter(group=OuterRef("pk"), run__slug=rule.slug)
        groups = groups.filter(Exists(reports))
    return groups


def _group_finding(group: ErrorGroup, what: str, slug: str) -> Finding:
    text = f"{what}: {group.title}" + (f" ({group.culprit})" if group.culprit else "")
    path = reverse("telemetry:error_detail", args=[group.pk])
    return Finding(f"group:{group.pk}", text[:300], group.count, slug, path)


def new_error_group(rule: AlertRule, now: datetime) -> list[Finding]:
    """Groups created since the rule last looked (never an ignored one).

    Read by id above `cursor`, which trails the newest id seen by one round: a group
    committed a moment after a higher id (two workers) is still found, and the rule's
    states keep it from firing twice.
    """
    found = list(
        _groups(rule)
        .filter(id__gt=rule.cursor)
        .exclude(status=ErrorGroup.Status.IGNORED)
        .order_by("id")[:500]
    )
    rule.cursor, rule.cursor_next = (
        rule.cursor_next,
        max([rule.cursor_next, *(g.pk for g in found)]),
    )
    return [_group_finding(g, "new error group", rule.slug) for g in found]


def error_group_regressed(rule: AlertRule, now: datetime) -> list[Finding]:
    """Resolved groups seen again; clears when an operator resolves, reopens or ignores."""
    regressed = ErrorGroup.objects.filter(
        project=rule.project, regressed=True, status=ErrorGroup.Status.UNRESOLVED
    ).order_by("-last_seen")[:500]
    return [_group_finding(g, "regressed", "") for g in regressed]


# --- Runs --------------------------------------------------------------------------
# Read once per project and round (`shared`), then narrowed to each rule's slug: a
# project with many slug-scoped rules still costs one read of its runs per condition.

_round: ContextVar[dict | None] = ContextVar("alert_round", default=None)


@contextmanager
def one_round() -> Iterator[None]:
    """Within it, `shared` reads are made once (evaluation.run_round)."""
    token = _round.set({})
    try:
        yield
    finally:
        _round.reset(token)


def shared(key: tuple, read: Callable[[], Any]) -> Any:
    memo = _round.get()
    if memo is None:
        return read()
    if key not in memo:
        memo[key] = read()
    return memo[key]


def _for_slug(rule: AlertRule, runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.slug == rule.slug] if rule.slug else runs


def run_orphaned(rule: AlertRule, now: datetime) -> list[Finding]:
    """Runs that died silently (SPEC §7); clears when the run speaks again or is reset."""
    orphans = shared(
        ("orphans", rule.project_id),
        lambda: list(Run.objects.orphans(now).filter(project=rule.project).order_by("id")[:2000]),
    )
    found = []
    for run in _for_slug(rule, orphans)[:500]:
        seen = run.last_seen_at or run.started_at or run.created
        silent = int((now - seen).total_seconds())
        text = (
            f"{run.slug or '-'}: run {run.run_id} is orphaned "
            f"(last sign of life {seen:%Y-%m-%d %H:%M:%S} UTC)"
        )
        found.append(Finding(f"run:{run.pk}", text, silent, run.slug, run.get_absolute_url()))
    return found


def run_failed(rule: AlertRule, now: datetime) -> list[Finding]:
    """Runs that finished failed or crashed since the rule exists (a day back at most)."""
    failed = shared(
        ("failed", rule.project_id),
        lambda: list(
            Run.objects.filter(
                project=rule.project,
                status__in=[Run.Status.FAILED, Run.Status.CRASHED],
                finished_at__gte=now - EVENT_LOOKBACK,
            ).order_by("id")[:5000]
        ),
    )
    since = max(now - EVENT_LOOKBACK, rule.created)
    found = []
    for run in _for_slug(rule, failed):
        if run.finished_at < since:
            continue
        code = f" (exit code {run.exit_code})" if run.exit_code is not None else ""
        text = f"{run.slug or '-'}: run {run.run_id} {run.status}{code}"
        value = run.exit_code if run.exit_code is not None else None
        found.append(Finding(f"run:{run.pk}", text, value, run.slug, run.get_absolute_url()))
    return found[:500]


def cost_over(rule: AlertRule, now: datetime) -> list[Finding]:
    """A slug's spend on runs started this UTC day, above the threshold in USD."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    spend = shared(
        ("spend", rule.project_id, day),
        lambda: dict(
            Run.objects.filter(project=rule.project)
            .alias(started=Coalesce("started_at", "created"))
            .filter(started__gte=day, started__lt=day + timedelta(days=1))
            .values("slug")
            .annotate(usd=Sum("cost_usd"))
            .values_list("slug", "usd")
        ),
    )
    found = []
    for slug, usd in sorted(spend.items(), key=lambda item: -item[1]):
        if (rule.slug and slug != rule.slug) or float(usd) <= (rule.threshold or 0):
            continue
        text = f"{slug or '-'}: ${usd:,.2f} spent on {day:%Y-%m-%d} (UTC)"
        text += f", budget ${rule.threshold:,.2f}"
        # The day is part of the subject: tomorrow's overspend is news again.
        subject = f"slug:{slug}@{day:%Y-%m-%d}"
        found.append(Finding(subject, text, round(float(usd), 6), slug, _runs_path(rule, slug)))
    return found


def no_runs(rule: AlertRule, now: datetime) -> list[Finding]:
    """The dead-man's switch: a slug with no sign of life (a run started, an event, a
    heartbeat) for the window. Without a slug, every slug the project has runs of."""
    cutoff = now - timedelta(minutes=rule.window_minutes or 1)
    if rule.created > cutoff:
        return []  # give a new rule one window before it judges silence
    last = shared(
        ("last seen", rule.project_id),
        lambda: dict(
            Run.objects.filter(project=rule.project)
            .values("slug")
            .annotate(seen=Max(Greatest("created", "last_event_at", "last_heartbeat")))
            .order_by()
            .values_list("slug", "seen")
        ),
    )
    seen = {rule.slug: last.get(rule.slug)} if rule.slug else last
    found = []
    for slug, at in sorted(seen.items()):
        if at is not None and at >= cutoff:
            continue
        minutes = int((now - at).total_seconds() // 60) if at else None
        quiet = f"no run since {at:%Y-%m-%d %H:%M} UTC" if at else "no run ever"
        text = f"{slug or '-'}: {quiet} (window {rule.window_minutes} min)"
        found.append(Finding(f"slug:{slug}", text, minutes, slug, _runs_path(rule, slug)))
    return found


# --- The portal itself -------------------------------------------------------------


def ingest_backlog(rule: AlertRule, now: datetime) -> list[Finding]:
    """The project's oldest batch still waiting for a worker, older than the threshold."""
    pending = IngestBatch.objects.filter(project=rule.project, state=IngestBatch.State.PENDING)
    oldest = pending.aggregate(at=Min("received_at"))["at"]
    if oldest is None:
        return []
    age = int((now - oldest).total_seconds())
    if age < (rule.threshold or 0):
        return []
    text = (
        f"{rule.project.slug}: the oldest pending ingest batch is {age} s old "
        f"(threshold {rule.threshold:g} s): are the workers running?"
    )
    return [Finding("project", text, age, "", reverse("telemetry:status"))]


# Error events, events and runs started per hour since `since`, hour 0 being the one
# that ends at `until`, from the per-minute counts: one statement.
_HOURLY_SQL = """
WITH errors AS (
    SELECT floor(extract(epoch FROM (%(until)s - minute - interval '1 microsecond')) / 3600)::int
               AS k,
           sum(errors) AS errors, sum(events) AS events
    FROM {counts}
    WHERE project_id = %(project)s {slug_filter}
      AND minute >= %(since)s AND minute < %(until)s
    GROUP BY 1
), runs AS (
    SELECT floor(extract(epoch FROM (%(until)s - COALESCE(started_at, created)
                                     - interval '1 microsecond')) / 3600)::int AS k,
           count(*) AS runs
    FROM runs_run
    WHERE project_id = %(project)s {slug_filter}
      AND COALESCE(started_at, created) >= %(since)s AND COALESCE(started_at, created) < %(until)s
    GROUP BY 1
)
SELECT k, COALESCE(errors.errors, 0), COALESCE(errors.events, 0), COALESCE(runs.runs, 0)
FROM errors FULL JOIN runs USING (k)
"""


def _hourly(
    rule: AlertRule, since: datetime, until: datetime
) -> dict[int, tuple[float, float, int]]:
    """(errors, events, runs started) per hour of [since, until), hour 0 the newest."""
    params = {"since": since, "until": until, "project": rule.project.pk, "slug": rule.slug}
    if rule.slug:
        # Per slug only errors are counted: an hour is active when it saw errors or runs.
        counts = (
            "(SELECT project_id, slug, minute, errors, errors AS events "
            "FROM telemetry_slugerrorcount) AS c"
        )
        sql = _HOURLY_SQL.format(counts=counts, slug_filter="AND slug = %(slug)s")
    else:
        sql = _HOURLY_SQL.format(counts="runs_eventcount", slug_filter="")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {k: (float(e), float(n), int(r)) for k, e, n, r in cursor.fetchall()}


def _rate(errors: float, runs: int) -> float:
    return errors / max(1, runs)


def baseline(rule: AlertRule, now: datetime) -> float | None:
    """The mean of error events per run started over the active hours of the 168 whole
    hours before this one; None with too little history. Computed once an hour per rule
    and kept on it (the one costly read of the conditions)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    if rule.baseline_hour == hour:
        return rule.baseline
    hours = _hourly(rule, hour - timedelta(hours=BASELINE_HOURS), hour)
    active = [(e, r) for e, n, r in hours.values() if n or r]
    value = None
    if len(active) >= BASELINE_MIN_HOURS:
        value = sum(_rate(e, r) for e, r in active) / len(active)
    rule.baseline, rule.baseline_hour = value, hour
    AlertRule.objects.filter(pk=rule.pk).update(baseline=value, baseline_hour=hour)
    return value


def error_rate_above_baseline(rule: AlertRule, now: datetime) -> list[Finding]:
    """Error events per run started in the last 60 minutes against the baseline; the
    value is how many percent above it."""
    mean = baseline(rule, now)
    if not mean:
        return []  # too little history, or a project that never errs (error_events is for it)
    hour = _hourly(rule, now - timedelta(hours=1), now).get(0)
    if hour is None or not (hour[1] or hour[2]):
        return []
    current = _rate(hour[0], hour[2])
    above = (current - mean) / mean * 100
    if above <= (rule.threshold or 0):
        return []
    subject, who = _subject(rule)
    text = (
        f"{who}: {current:.2f} error events per run in the last hour, {above:.0f}% above "
        f"the 7-day hourly mean of {mean:.2f} (threshold {rule.threshold:g}%)"
    )
    path = _runs_path(rule, rule.slug) if rule.slug else reverse("telemetry:errors")
    return [Finding(subject, text, round(above, 1), rule.slug, path)]


CONDITIONS: dict[str, ConditionCheck] = {
    Condition.ERROR_EVENTS: ConditionCheck(error_events, resolves=True),
    Condition.NEW_ERROR_GROUP: ConditionCheck(new_error_group, resolves=False),
    Condition.ERROR_GROUP_REGRESSED: ConditionCheck(error_group_regressed, resolves=True),
    Condition.RUN_ORPHANED: ConditionCheck(run_orphaned, resolves=True),
    Condition.RUN_FAILED: ConditionCheck(run_failed, resolves=False),
    Condition.RATE_LIMITED: ConditionCheck(rate_limited, resolves=True),
    Condition.COST_OVER: ConditionCheck(cost_over, resolves=False),
    Condition.NO_RUNS: ConditionCheck(no_runs, resolves=True),
    Condition.INGEST_BACKLOG: ConditionCheck(ingest_backlog, resolves=True),
    Condition.ERROR_RATE_ABOVE_BASELINE: ConditionCheck(error_rate_above_baseline, resolves=True),
}
assert set(CONDITIONS) == set(Condition.values)
