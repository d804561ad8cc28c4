"""`manage.py dashboard`: a live terminal summary, like Code Buddy's terminal dashboard.

Runs active and orphaned, error rate over the last hour, events per second over the
last minute, tokens and cost over the last hour, the tools failing most. Redrawn every
`--interval` seconds until Ctrl-C; `--once` prints one frame (for scripts and tests).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.utils import timezone

from runs import insights
from runs.models import Run

CLEAR = "\x1b[2J\x1b[H"
RULE = "─" * 72
TOP_TOOLS = 5


def _event_counts(now: datetime) -> tuple[int, int, int]:
    """Events in the last minute, in the last hour, errors in the last hour (BRIN on ts)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*) FILTER (WHERE ts >= %(minute)s), count(*),
                   count(*) FILTER (WHERE level = 'error')
            FROM runs_event WHERE ts >= %(hour)s AND ts <= %(now)s
            """,
            {"minute": now - timedelta(minutes=1), "hour": now - timedelta(hours=1), "now": now},
        )
        return cursor.fetchone()


def _backlog() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM telemetry_ingestbatch WHERE state = 'pending'")
        return cursor.fetchone()[0]


def frame(now: datetime | None = None) -> str:
    now = now or timezone.now()
    hour_ago = now - timedelta(hours=1)
    active = Run.objects.filter(status=Run.Status.RUNNING).count()
    orphaned = Run.objects.orphans(now).count()
    last_minute, last_hour, errors = _event_counts(now)
    llm = insights.provider_stats(hour_ago, now)
    tokens_in = sum(p.tokens_in for p in llm)
    tokens_out = sum(p.tokens_out for p in llm)
    cost = sum(p.cost_usd for p in llm)
    requests = sum(p.requests for p in llm)
    tools = [t for t in insights.tool_stats(hour_ago, now, rows=TOP_TOOLS) if t.errors]
    rate = f"{errors / last_hour * 100:.1f} %" if last_hour else "—"

    lines = [
        f"Runlens dashboard · {now:%Y-%m-%d %H:%M:%S} UTC",
        RULE,
        f"Runs     active {active:,}   orphaned {orphaned:,}"
        + ("   [!] see doctor --runs" if orphaned else ""),
        f"Events   {last_minute / 60:,.1f}/s last minute   {last_hour:,} last hour",
        f"Errors   {errors:,} last hour   error rate {rate}",
        f"LLM      {requests:,} calls   tokens in {tokens_in:,} / out {tokens_out:,}"
        f"   cost ${cost:,.4f}   (last hour)",
        f"Ingest   backlog {_backlog():,} batch(es)",
        RULE,
        "Top tools by failures (last hour)",
    ]
    if tools:
        lines.append(f"  {'Tool':<28}{'Calls':>8}{'Errors':>8}{'Success':>9}{'Reliab.':>9}")
        for tool in tools:
            name = tool.tool if len(tool.tool) <= 27 else tool.tool[:26] + "…"
            lines.append(
                f"  {name:<28}{tool.calls:>8,}{tool.errors:>8,}"
                f"{tool.success_rate * 100:>8.1f}%{tool.reliability:>9.2f}"
            )
    else:
        lines.append("  no failing tools")
    return "\n".join(lines)


class Command(BaseCommand):
    help = "A live terminal summary: runs, error rate, events/s, tokens, cost, failing tools."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="print one frame and exit")
        parser.add_argument(
            "--interval", type=float, default=1.0, help="seconds between frames (default 1)"
        )

    def handle(self, once: bool, interval: float, **options):
        if interval < 0.2:
            raise CommandError("--interval must be at least 0.2 seconds")
        if once:
            self.stdout.write(frame())
            return
        try:
            while True:
                text = frame()
                self.stdout.write(CLEAR + text + "\n\n(Ctrl-C to quit)", ending="")
                self.stdout.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            self.stdout.write("")  # leave the prompt on a fresh line; exit 0
