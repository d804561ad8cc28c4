from django.core.management.base import BaseCommand

from telemetry import retention


class Command(BaseCommand):
    help = "Apply retention now: keep the newest N runs per slug, drop runs past the max age."

    def handle(self, **options):
        for slug, deleted in retention.prune().items():
            self.stdout.write(f"{slug}: {deleted} run(s) deleted")
