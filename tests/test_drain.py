"""The worker stores pending batches of a kind several per transaction (pipeline.drain),
woken once per burst of requests (telemetry/ingest/wakeup.py)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from telemetry.ingest import pipeline
from telemetry.models import ErrorGroup, ErrorReport, IngestBatch
from tests.test_request_ids import json_lines, worker_log  # noqa: F401  (the fixture)
from tests.test_sentry_receiver import envelope, event
from tests.test_worker import wait_for


def spool(project, body: bytes, **params) -> IngestBatch:
    """A Sentry envelope as the request spools it. Outside a committed transaction the
    wake-up never fires: the batch stays pending for the test to drain."""
    return IngestBatch.spool(project, body, kind="sentry", params={"event_id": "", **params})


def group_upserts(queries) -> int:
    return sum(1 for q in queries if "INSERT INTO telemetry_errorgroup" in q["sql"])


def test_pending_envelopes_are_stored_together_in_one_transaction(project):
    batches = [spool(project, envelope(({"type": "event"}, event(f"boom {i}")))) for i in range(5)]

    with CaptureQueriesContext(connection) as queries:
        assert pipeline.drain("sentry") == 5

    assert ErrorReport.objects.count() == 5
    assert group_upserts(queries) == 1  # one statement for the five events' groups
    assert {b.state for b in IngestBatch.objects.all()} == {"done"}
    assert [IngestBatch.objects.get(pk=b.pk).summary["stored"] for b in batches] == [1] * 5


def test_batches_of_run_events_keep_a_transaction_each(project):
    # Their runs are locked while stored: two workers each holding many batches' runs
    # would wait on each other.
    from tests.conftest import ndjson, record

    for i in range(3):
        IngestBatch.spool(project, ndjson(record("a.b", slug=f"s{i}")), params={"run_id": f"r{i}"})

    with CaptureQueriesContext(connection) as queries:
        assert pipeline.drain("events") == 3

    claims = [q for q in queries if "SKIP LOCKED" in q["sql"]]
    assert len(claims) == 4  # one a batch, then the one that finds none
    assert all("LIMIT 1" in q["sql"] for q in claims)


def test_the_byte_budget_keeps_large_bodies_in_transactions_of_their_own(project, settings):
    settings.DRAIN_BYTES = 1
    for i in range(3):
        spool(project, envelope(({"type": "event"}, event(f"boom {i}"))))

    with CaptureQueriesContext(connection) as queries:
        assert pipeline.drain("sentry") == 3

    assert ErrorReport.objects.count() == 3
    assert group_upserts(queries) == 3


def test_a_backlog_larger_than_one_round_asks_once_for_a_second_worker(project, settings):
    settings.DRAIN_BATCHES = 2
    for i in range(5):
        spool(project, envelope(({"type": "event"}, event(f"boom {i}"))))
    asked = []

    assert pipeline.drain("sentry", more=lambda: asked.append(1)) == 5

    assert asked == [1]
    assert pipeline.drain("sentry", more=lambda: asked.append(1)) == 0
    assert asked == [1]


def test_an_event_sent_twice_in_one_round_is_stored_once(project):
    twice = event("resent")
    spool(project, envelope(({"type": "event"}, twice)))
    spool(project, envelope(({"type": "event"}, twice)))

    assert pipeline.drain("sentry") == 2

    assert ErrorReport.objects.get().event_id == twice["event_id"]
    assert ErrorGroup.objects.get().count == 1
    stored = sorted(b.summary["stored"] for b in IngestBatch.objects.all())
    assert stored == [0, 1]


def test_a_batch_that_fails_does_not_keep_the_others_of_its_round_from_being_stored(project):
    good = [spool(project, envelope(({"type": "event"}, event(f"ok {i}")))) for i in range(2)]
    # Spooled bodies were judged by the request; this one cannot be read at all.
    bad = spool(project, b'{}\n{"type": "event", "length": 999}\n{}')
    good.append(spool(project, envelope(({"type": "event"}, event("ok 2")))))

    pipeline.drain("sentry")

    assert ErrorReport.objects.count() == 3
    assert {IngestBatch.objects.get(pk=b.pk).state for b in good} == {"done"}
    bad.refresh_from_db()
    assert (bad.state, bad.attempts) == ("pending", 1)
    assert "EnvelopeError" in bad.error


def test_each_stored_report_keeps_the_request_of_its_own_batch(project):
    first = IngestBatch.spool(
        project, envelope(({"type": "event"}, event("a"))), kind="sentry", request_id="req-a"
    )
    IngestBatch.spool(
        project, envelope(({"type": "event"}, event("b"))), kind="sentry", request_id="req-b"
    )
    assert first.request_id == "req-a"

    pipeline.drain("sentry")

    assert dict(ErrorReport.objects.values_list("message", "request_id")) == {
        "a": "req-a",
        "b": "req-b",
    }


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_burst_of_requests_is_stored_by_a_real_worker_woken_once_per_burst(
    worker_log,  # noqa: F811  (the fixture)
    project,
):
    sent = [event(f"burst {i}") for i in range(40)]
    auth = f"Sentry sentry_version=7, sentry_key={project.public_key}"
    answers: list[int] = []

    def send(events: list[dict]) -> None:
        from django.test import Client

        own = Client()
        for e in events:
            response = own.post(
                f"/api/{project.pk}/envelope/",
                envelope(({"type": "event"}, e)),
                content_type="application/x-sentry-envelope",
                HTTP_X_SENTRY_AUTH=auth,
            )
            answers.append(response.status_code)
        connections.close_all()  # this thread's connection, before the database is dropped

    threads = [threading.Thread(target=send, args=(sent[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers == [200] * 40
    assert wait_for(lambda: ErrorReport.objects.count() == 40), "the worker did not store all"
    assert not IngestBatch.objects.filter(state="pending").exists()
    woken = [
        line
        for line in json_lines(worker_log)
        if line.get("logger") == "celery.app.trace" and "drain_spool" in line.get("msg", "")
    ]
    woken = len(woken)
    assert 1 <= woken < 40, woken  # a message a burst, not one a request


# --- The request's half: one statement, committed before the answer -------------------


@pytest.mark.django_db(transaction=True)
def test_a_batch_is_committed_before_its_request_is_answered(client, token):
    import psycopg

    from tests.conftest import ndjson, record
    from tests.test_worker import database_url

    response = client.post(
        "/api/ingest/events?run_id=durable",
        ndjson(record("run.begin")),
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_IDEMPOTENCY_KEY="once",
    )
    assert response.status_code == 202
    # Another connection sees it at once: the request did not leave it uncommitted.
    with psycopg.connect(database_url()) as other:
        seen = other.execute("SELECT count(*) FROM telemetry_ingestbatch").fetchone()[0]
    assert seen == 1

    again = client.post(
        "/api/ingest/events?run_id=durable",
        ndjson(record("run.begin")),
        content_type="application/x-ndjson",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_IDEMPOTENCY_KEY="once",
    )
    assert again.status_code == 202
    assert again.json()["batch"] == response.json()["batch"]
    assert IngestBatch.objects.count() == 1
