"""One function per alert condition: what is true now, read from the cheap tables.

Each returns the rule's findings, one per subject (the project, a slug, a run, an
error group). None reads `runs_event`: counts come from the per-minute tables the
worker keeps (EventCount, SlugErrorCount, RefusalCount), the rest from runs, error
groups and the spool's pending index, each bounded by the rule's project and
window. docs/alerts.md says what each condition means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


def _runs(rule: AlertRule):
    runs = Run.objects.filter(project=rule.project)
    return runs.filter(slug=rule.slug) if rule.slug else runs


def run_orphaned(rule: AlertRule, now: datetime) -> list[Finding]:
    """Runs that died silently (SPEC §7); clears when the run speaks again or is reset."""
    orphans = Run.objects.orphans(now).filter(project=rule.project)
    if rule.slug:
        orphans = orphans.filter(slug=rule.slug)
    found = []
    for run in orphans.order_by("id")[:500]:
        seen = run.last_seen_at or run.started_at or run.created
        silent = int((now - seen).total_seconds())
        text = f"{run.slug or '-'}: run {run.run_id} is orphaned (silent for {silent} s)"
        found.append(Finding(f"run:{run.pk}", text, silent, run.slug, run.get_absolute_url()))
    return found


def run_failed(rule: AlertRule, now: datetime) -> list[Finding]:
    """Runs that finished failed or crashed since the rule exists (a day back at most)."""
    since = max(now - EVENT_LOOKBACK, rule.created)
    failed = (
        _runs(rule)
        .filter(status__in=[Run.Status.FAILED, Run.Status.CRASHED], finished_at__gte=since)
        .order_by("id")[:500]
    )
    found = []
    for run in failed:
        code = f" (exit code {run.exit_code})" if run.exit_code is not None else ""
        text = f"{run.slug or '-'}: run {run.run_id} {run.status}{code}"
        value = run.exit_code if run.exit_code is not None else None
        found.append(Finding(f"run:{run.pk}", text, value, run.slug, run.get_absolute_url()))
    return found


def cost_over(rule: AlertRule, now: datetime) -> list[Finding]:
    """A slug's spend on runs started this UTC day, above the threshold in USD."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    spend = (
        _runs(rule)
        .alias(started=Coalesce("started_at", "created"))
        .filter(started__gte=day, started__lt=day + timedelta(days=1))
        .values("slug")
        .annotate(usd=Sum("cost_usd"))
        .filter(usd__gt=rule.threshold or 0)
        .order_by("-usd")
    )
    found = []
    for row in spend:
        usd = float(row["usd"])
        text = (
            f"{row['slug'] or '-'}: ${usd:,.2f} spent on {day:%Y-%m-%d} (UTC), "
            f"budget ${rule.threshold:,.2f}"
        )
        # The day is part of the subject: tomorrow's overspend is news again.
        subject = f"slug:{row['slug']}@{day:%Y-%m-%d}"
        found.append(
            Finding(subject, text, round(usd, 6), row["slug"], _runs_path(rule, row["slug"]))
        )
    return found


def no_runs(rule: AlertRule, now: datetime) -> list[Finding]:
    """The dead-man's switch: a slug with no sign of life (a run started, an event, a
    heartbeat) for the window. Without a slug, every slug the project has runs of."""
    cutoff = now - timedelta(minutes=rule.window_minutes or 1)
    if rule.created > cutoff:
        return []  # give a new rule one window before it judges silence
    last = (
        _runs(rule)
        .values("slug")
        .annotate(seen=Max(Greatest("created", "last_event_at", "last_heartbeat")))
        .order_by()
    )
    seen = {row["slug"]: row["seen"] for row in last}
    if rule.slug:
        seen.setdefault(rule.slug, None)
    found = []
    for slug, at in sorted(seen.items()):
        if at is not None and at >= cutoff:
            continue
        minutes = int((now - at).total_seconds() // 60) if at else None
        quiet = f"no run for {minutes} min" if minutes is not None else "no run ever"
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


# One statement: error events and runs started per hour, hour 0 being the last 60
# minutes and hours 1..168 the trailing week, from the per-minute counts.
_HOURLY_SQL = """
WITH errors AS (
    SELECT floor(extract(epoch FROM (%(now)s - minute)) / 3600)::int AS k,
           sum(errors) AS errors, sum(events) AS events
    FROM {counts}
    WHERE project_id = %(project)s {slug_filter}
      AND minute > %(now)s - interval '169 hours' AND minute <= %(now)s
    GROUP BY 1
), runs AS (
    SELECT floor(extract(epoch FROM (%(now)s - COALESCE(started_at, created))) / 3600)::int AS k,
           count(*) AS runs
    FROM runs_run
    WHERE project_id = %(project)s {run_slug_filter}
      AND COALESCE(started_at, created) > %(now)s - interval '169 hours'
      AND COALESCE(started_at, created) <= %(now)s
    GROUP BY 1
)
SELECT k, COALESCE(errors.errors, 0), COALESCE(errors.events, 0), COALESCE(runs.runs, 0)
FROM errors FULL JOIN runs USING (k)
"""


def error_rate_above_baseline(rule: AlertRule, now: datetime) -> list[Finding]:
    """Error events per run started in the last hour against the mean of the same ratio
    over the week's active hours before it; value in percent above that mean."""
    params = {"now": now, "project": rule.project.pk, "slug": rule.slug}
    if rule.slug:
        # Per slug only errors are counted: an hour is active when it saw errors or runs.
        sql = _HOURLY_SQL.format(
            counts="(SELECT project_id, slug, minute, errors, errors AS events "
            "FROM telemetry_slugerrorcount) AS c",
            slug_filter="AND slug = %(slug)s",
            run_slug_filter="AND slug = %(slug)s",
        )
    else:
        sql = _HOURLY_SQL.format(counts="runs_eventcount", slug_filter="", run_slug_filter="")
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        hours = {
            k: (float(errors), float(events), int(runs))
            for k, errors, events, runs in cursor.fetchall()
        }

    def rate(k: int) -> float:
        errors, _, runs = hours[k]
        return errors / max(1, runs)

    active = [
        k for k in range(1, BASELINE_HOURS + 1) if k in hours and (hours[k][1] or hours[k][2])
    ]
    if len(active) < BASELINE_MIN_HOURS or 0 not in hours:
        return []  # too little history to call anything unusual
    baseline = sum(rate(k) for k in active) / len(active)
    current = rate(0)
    if baseline <= 0:
        return []  # a project that never errs: error_events is the rule for it
    above = (current - baseline) / baseline * 100
    if above <= (rule.threshold or 0):
        return []
    subject, who = _subject(rule)
    text = (
        f"{who}: {current:.2f} error events per run in the last hour, {above:.0f}% above "
        f"the 7-day hourly mean of {baseline:.2f} (threshold {rule.threshold:g}%)"
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
