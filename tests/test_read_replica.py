"""DATABASE_READ_URL: pages, read APIs and exports read from the replica; ingest, workers
and the admin use the primary. The replica here is a second alias of the test database
on the same server, with connections of its own, so each alias's query log says which
connection a query went to."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.db import REPLICA, read_alias, reading_from_replica
from runs.models import Event, Run, RunMetric
from tests.conftest import ndjson, record

# Committed rows (transaction=True): the replica's connection sees what the primary wrote.
pytestmark = pytest.mark.django_db(transaction=True, databases=["default", REPLICA])


@pytest.fixture(scope="module", autouse=True)
def replica(django_db_setup, django_db_blocker):
    """What DATABASE_READ_URL pointing at the same database makes, added for this module."""
    default = connections.settings["default"]
    connections.settings[REPLICA] = {**default, "TEST": {**default["TEST"], "MIRROR": None}}
    yield
    with django_db_blocker.unblock():
        connections[REPLICA].close()
    del connections[REPLICA]
    del connections.settings[REPLICA]


@contextmanager
def query_logs():
    with (
        CaptureQueriesContext(connections["default"]) as primary,
        CaptureQueriesContext(connections[REPLICA]) as replica,
    ):
        yield primary, replica


def touching(queries, table: str) -> list[str]:
    return [q["sql"] for q in queries if f'"{table}"' in q["sql"] or f" {table} " in q["sql"]]


@pytest.fixture
def stored_run(project) -> Run:
    run = Run.objects.create(project=project, run_id="r1", slug="octo__cat", status="running")
    Event.objects.create(run=run, seq=1, ts=timezone.now(), level="info", event="run.begin")
    RunMetric.objects.create(
        project=project, run=run, name="latency_ms", value=12.5, recorded_at=timezone.now()
    )
    return run


def test_pages_read_runs_from_the_replica(operator_client, stored_run):
    with query_logs() as (primary, replica):
        for url in ("/", "/runs/r1", "/errors", "/insights"):
            assert operator_client.get(url).status_code == 200, url
    assert touching(replica, "runs_run") and touching(replica, "runs_event")
    assert not touching(primary, "runs_run") and not touching(primary, "runs_event")
    # Sessions and users stay on the primary: a login is seen at once.
    assert touching(primary, "django_session") and not touching(replica, "django_session")


def test_read_apis_and_streamed_exports_read_from_the_replica(client, token, stored_run):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    with query_logs() as (primary, replica):
        assert client.get("/api/runs/r1", **auth).status_code == 200
        stream = client.get("/api/runs/r1/events?format=jsonl", **auth)
        assert b'"run.begin"' in b"".join(stream.streaming_content)
        aggregate = client.get(
            "/api/analytics/metrics?metricName=latency_ms&aggregation=avg", **auth
        )
        assert aggregate.json()["value"] == 12.5
        export = client.get("/api/analytics/export?metricName=latency_ms&format=csv", **auth)
        assert b"latency_ms" in b"".join(export.streaming_content)
    assert touching(replica, "runs_event") and touching(replica, "runs_runmetric")
    assert not touching(primary, "runs_event") and not touching(primary, "runs_runmetric")


def test_ingest_and_its_worker_use_the_primary_only(post_events, project):
    with query_logs() as (primary, replica):
        response = post_events(ndjson(record("run.begin"), record("a.b")), run_id="fresh")
    assert response.status_code == 202
    assert Event.objects.filter(run__run_id="fresh").count() == 2
    assert not replica, [q["sql"] for q in replica]
    assert touching(primary, "telemetry_ingestbatch")


def test_the_admin_health_and_status_read_the_primary(admin_client, stored_run):
    with query_logs() as (primary, replica):
        assert admin_client.get("/admin/runs/run/").status_code == 200
        assert admin_client.get("/health").status_code == 200
        assert admin_client.get("/status").status_code == 200
    assert touching(primary, "runs_run") and not replica


def test_writes_made_while_reading_from_the_replica_go_to_the_primary(stored_run):
    with reading_from_replica(), query_logs() as (primary, replica):
        assert read_alias() == REPLICA
        run = Run.objects.get(run_id="r1")
        run.phase = "WORKING"
        run.save(update_fields=["phase"])
    assert touching(replica, "runs_run") and not [q for q in replica if "UPDATE" in q["sql"]]
    assert [q for q in primary if q["sql"].startswith("UPDATE")]


def test_outside_a_request_everything_reads_the_primary():
    assert read_alias() == "default"
