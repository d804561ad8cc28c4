"""What telemetry knows about a run, as sections of the run page.

`runs` is the domain app and never imports `telemetry`; the run page's template
loads this library instead (`{% load telemetry_panels %}{% run_errors run %}`), so
the runs view knows nothing of spans or error reports and the page is still
complete without JavaScript. Each tag runs its own bounded queries, only when the
full page is rendered (never for the timeline's htmx fragments).
"""

from __future__ import annotations

from datetime import timedelta

from django import template
from django.conf import settings
from django.utils import timezone

from runs.models import Run
from telemetry.models import ErrorReport
from telemetry.traces import run_traces

register = template.Library()


@register.inclusion_tag("telemetry/_run_spans.html")
def run_spans(run: Run) -> dict:
    """The "Spans" section: the run's traces, linking to their waterfalls (two queries)."""
    traces, more = run_traces(run)
    return {"run": run, "traces": traces, "more_traces": more}


@register.inclusion_tag("telemetry/_run_errors.html")
def run_errors(run: Run) -> dict:
    """The "Errors" section: the error groups this run fed, whatever their source (one
    query, on the reports' index by run). Not only error events and crashes make reports
    of a run: a Sentry event tagged with its `run_id`, or in one of its traces, does too,
    without touching the run's counters, so the query runs for every run.

    A run can count error events whose reports are gone: retention
    (`telemetry.retention.prune_error_reports`) deletes reports by age and caps each group
    at its newest reports, while the run's counters and events stay. The section then
    says which rule removed them instead of "no errors", which the counters contradict.
    """
    groups = ErrorReport.objects.groups_of_run(run)
    made_reports = bool(run.errors_count) or run.status == Run.Status.CRASHED
    context = {"run": run, "groups": groups, "removed": made_reports and not groups}
    if context["removed"]:
        days = settings.ERROR_REPORT_MAX_AGE_DAYS
        # Reports are stamped when received: no later than the run's newest sign of life.
        newest = max(t for t in (run.last_seen_at, run.created) if t is not None)
        context.update(
            max_age_days=days,
            per_group=settings.ERROR_REPORTS_PER_GROUP,
            too_old=newest < timezone.now() - timedelta(days=days),
        )
    return context
