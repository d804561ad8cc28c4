"""`logs SLUG`: the latest run's events, like `gitoma logs`, read from the database."""

from __future__ import annotations

import json
from time import sleep

from django.core.management.base import BaseCommand, CommandError

from runs.formatting import clock
from runs.models import Event, Run

PAGE = 2000
POLL_SECONDS = 1.0
MAX_VALUE = 200


def slug_candidates(name: str) -> list[str]:
    """The slug as given, and `owner__repo` for `owner/repo` or a repository URL."""
    names = [name]
    parts = [p for p in name.rstrip("/").removesuffix(".git").split("/") if p]
    if len(parts) >= 2:
        names.append(f"{parts[-2]}__{parts[-1]}")
    return names


def human(event: Event) -> str:
    """`HH:MM:SS.mmm LEVEL  phase  event  key=value…`: one compact line for people."""
    ts = clock(event.ts)
    fields = [f"{key}={_value(value)}" for key, value in event.data.items()]
    if event.message:
        fields.insert(0, _value(event.message))
    line = f"{ts} {event.level.upper():<5}  {event.phase or '-'}  {event.event}"
    return f"{line}  {' '.join(fields)}" if fields else line


def _compact(value) -> str:
    # The stdlib encoder, not orjson: JSONB may hold integers wider than 64 bits.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _value(value) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c == '"' for c in value):
        text = value
    else:
        text = _compact(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


class Command(BaseCommand):
    help = "Print the latest run's events of a slug (like `gitoma logs`)."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="owner__repo, owner/repo or a repository URL")
        parser.add_argument("--follow", action="store_true", help="stream until the run ends")
        parser.add_argument(
            "--filter", dest="prefix", default="", metavar="PREFIX", help="event name prefix"
        )
        parser.add_argument("--raw", action="store_true", help="Gitoma JSONL records, for jq")
        parser.add_argument("--project", default="", metavar="PROJECT_SLUG")

    def handle(self, slug, follow, prefix, raw, project, **options):
        run = self.latest_run(slug, project)
        after = 0
        try:
            while True:
                # Status first, events second: a batch stores its events and the run's
                # new status in one transaction, so a finished run has nothing left after.
                active = Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).exists()
                after = self.print_events(run, after, prefix, raw)
                if not (follow and active):
                    return
                sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            return

    def latest_run(self, slug: str, project: str) -> Run:
        runs = Run.objects.filter(slug__in=slug_candidates(slug))
        if project:
            runs = runs.filter(project__slug=project)
        run = runs.order_by("-id").first()
        if run is None:
            where = f" in project {project!r}" if project else ""
            raise CommandError(f"no runs for slug {slug!r}{where}")
        return run

    def print_events(self, run: Run, after: int, prefix: str, raw: bool) -> int:
        """Print events with seq > `after` in keyset pages; returns the last seq printed."""
        while True:
            events = Event.objects.filter(run_id=run.pk, seq__gt=after)
            if prefix:
                events = events.filter(event__startswith=prefix)
            page = list(events.order_by("seq")[:PAGE])
            for event in page:
                event.run = run  # as_record() reads the slug from it: no query per event
                line = _compact(event.as_record()) if raw else human(event)
                self.stdout.write(line)
            if len(page) < PAGE:
                return page[-1].seq if page else after
            after = page[-1].seq
