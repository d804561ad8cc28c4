from django.core.management.base import BaseCommand

from telemetry.ingest import pipeline
from telemetry.models import IngestBatch


class Command(BaseCommand):
    help = "Process pending ingest batches in this process (what the worker and sweeper do)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            type=int,
            default=0,
            help="only batches pending this many seconds",
        )

    def handle(self, older_than: int, **options):
        done = 0
        for batch_id in IngestBatch.objects.stale_pending(older_than=older_than, limit=100_000):
            done += pipeline.process(batch_id)
        self.stdout.write(f"{done} batch(es) processed")
