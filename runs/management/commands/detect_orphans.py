from django.core.management.base import BaseCommand

from runs.models import Run


class Command(BaseCommand):
    help = "Mark silent runs as orphaned (what beat does every 30 s)."

    def handle(self, **options):
        self.stdout.write(f"{Run.objects.mark_orphans()} run(s) marked orphaned")
