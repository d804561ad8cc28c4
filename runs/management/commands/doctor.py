"""`doctor --runs`: the tracked-runs table of `gitoma doctor --runs`, one row per slug."""

from __future__ import annotations

from datetime import datetime

from django.core.management.base import BaseCommand
from django.utils import timezone

from runs.formatting import ago
from runs.models import TERMINAL_PHASES, Run

MAX_ROWS = 50
FINISHED = {Run.Status.SUCCEEDED, Run.Status.FAILED, Run.Status.CRASHED, Run.Status.CANCELLED}
HEADERS = ("Repo", "Phase", "PID", "Heartbeat", "Verdict")
MIN_WIDTHS = (20, 12, 8, 12, 0)  # Gitoma's layout, widened when a value needs it
ORPHANS_ADMIN = "/admin/runs/run/?status__exact=orphaned"


def latest_per_slug(project: str = "") -> list[Run]:
    """The newest run of each slug, newest first, in one query (DISTINCT ON in a subquery)."""
    runs = Run.objects.all()
    if project:
        runs = runs.filter(project__slug=project)
    newest = runs.order_by("slug", "-id").distinct("slug").values("id")
    return list(Run.objects.filter(id__in=newest).order_by("-id")[:MAX_ROWS])


def verdict(run: Run, orphan_ids: set[int]) -> str:
    """done / idle / ORPHANED / running, with Gitoma's meaning.

    A clean exit at a non-terminal phase (Gitoma pausing at PR_OPEN for a review)
    is `idle` even though ingest recorded the run as succeeded: the agent stopped on
    purpose and waits for a person, which is what the column tells an operator.
    """
    waiting = run.exit_clean and run.phase and run.phase not in TERMINAL_PHASES
    if waiting and run.status in (Run.Status.RUNNING, Run.Status.SUCCEEDED):
        return "idle"
    if run.status in FINISHED or run.phase in TERMINAL_PHASES:
        return "done"
    if run.status == Run.Status.ORPHANED or run.pk in orphan_ids:
        return "ORPHANED"
    return "idle" if run.exit_clean else "running"


def age(run: Run, now: datetime) -> str:
    """How long since the run last showed life: its heartbeat or its newest event."""
    return ago(run.last_seen_at, now)


def repo(slug: str) -> str:
    return slug.replace("__", "/", 1) if "__" in slug else (slug or "(no slug)")


def row(run: Run, now: datetime, orphan_ids: set[int]) -> tuple[str, ...]:
    pid = str(run.pid) if run.pid is not None else "—"
    return (repo(run.slug), run.phase or "—", pid, age(run, now), verdict(run, orphan_ids))


class Command(BaseCommand):
    help = "Health checks. --runs: the tracked-runs table (done / idle / ORPHANED)."

    def add_arguments(self, parser):
        parser.add_argument("--runs", action="store_true", help="show tracked runs (default)")
        parser.add_argument("--project", default="", metavar="PROJECT_SLUG")

    def handle(self, runs, project, **options):
        # Tracked runs are the only check so far, so they are also what a bare `doctor` shows.
        rows = latest_per_slug(project)
        candidates = Run.objects.orphan_candidates().filter(pk__in=[run.pk for run in rows])
        orphan_ids = set(candidates.values_list("pk", flat=True))
        now = timezone.now()
        table = [row(run, now, orphan_ids) for run in rows]
        self.print_table(table)
        orphaned = sum(1 for cells in table if cells[-1] == "ORPHANED")
        if orphaned:
            self.stdout.write(f"\n[!]  {orphaned} orphaned run(s) detected.")
            self.stdout.write(f"  → Reset with: the admin's reset action on {ORPHANS_ADMIN}")
            self.stdout.write("  → Mark silent runs now: python manage.py detect_orphans")

    def print_table(self, table: list[tuple[str, ...]]) -> None:
        widths = [
            max([MIN_WIDTHS[i]] + [len(cells[i]) + 2 for cells in (HEADERS, *table)])
            for i in range(len(HEADERS))
        ]
        self.stdout.write("Tracked runs")
        self.stdout.write("─" * 60)
        for cells in (HEADERS, *table):
            line = "".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            self.stdout.write(line.rstrip())
        if not table:
            self.stdout.write("(no runs yet)")
