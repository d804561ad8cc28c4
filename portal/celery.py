"""The Celery app. Beat's schedule lives here, in code (SPEC §7)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("runlens")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    "sweep-pending-batches": {
        "task": "telemetry.tasks.sweep_pending",
        "schedule": 30.0,
    },
    "detect-orphans": {"task": "runs.tasks.detect_orphans", "schedule": 30.0},
    "retention": {"task": "runs.tasks.prune", "schedule": 3600.0},
}
