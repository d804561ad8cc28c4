# Work-context filters (runs/work_context.py): `attributes @> {...}` on a big runs table.

import django.contrib.postgres.indexes
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations


class Migration(migrations.Migration):
    # Built CONCURRENTLY: ingest keeps writing runs while the index is made.
    atomic = False

    dependencies = [
        ("runs", "0005_event_counts"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="run",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["attributes"], name="run_attributes_gin", opclasses=["jsonb_path_ops"]
            ),
        ),
    ]
