"""GET /metrics through the real Prometheus parsers: the lenient text parser and the
strict OpenMetrics one, with slugs full of quotes, backslashes and newlines."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from runs.models import Project, Run
from telemetry import prometheus
from telemetry.models import IngestBatch

HOSTILE = 'evil"slug\\with\nnewline'
OPENMETRICS = {"HTTP_ACCEPT": "application/openmetrics-text; version=1.0.0"}


@pytest.fixture(autouse=True)
def fresh_totals():
    # The running totals live in the process; each test starts from its own database.
    prometheus.ingest_totals.reset()
    yield
    prometheus.ingest_totals.reset()


def batch(project, kind="events", state="done", latency=0.2, age=timedelta(hours=1), **summary):
    received = timezone.now() - age
    return IngestBatch.objects.create(
        project=project,
        kind=kind,
        body=b"",
        state=state,
        received_at=received,
        processed_at=received + timedelta(seconds=latency) if state == "done" else None,
        summary=summary,
    )


@pytest.fixture
def world(project):
    hostile = Project.objects.create(name="Quotes", slug="quotes")
    now = timezone.now()
    for i, (ms, cost) in enumerate([(500, "0.10"), (4_000, "0.25"), (90_000, "1.00")]):
        Run.objects.create(
            project=project,
            run_id=f"r{i}",
            slug=HOSTILE,
            status="succeeded",
            started_at=now,
            duration_ms=ms,
            tokens_in=1000,
            tokens_out=10 * (i + 1),
            cost_usd=Decimal(cost),
        )
    Run.objects.create(project=hostile, run_id="live", slug="plain", status="running")
    Run.objects.create(project=project, run_id="gone", slug="plain", status="orphaned")
    batch(project, accepted=10, rejected=2, stored=10, latency=0.2)
    batch(project, accepted=5, rejected=0, stored=5, latency=3.0)
    batch(project, kind="otlp_traces", accepted=7, stored=7, latency=0.04)
    batch(project, state="pending", accepted=4, rejected=1, age=timedelta(seconds=30))
    return project


def families(text: str, parser) -> dict:
    return {family.name: family for family in parser(text)}


def value(family, name: str, **labels) -> float:
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]


def test_it_speaks_the_text_format_by_default(client, world):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    parsed = families(response.content.decode(), text_families)
    events = {"endpoint": "/api/ingest/events"}
    assert value(parsed["runlens_ingest_batches"], "runlens_ingest_batches_total", **events) == 3
    accepted = parsed["runlens_ingest_records_accepted"]
    assert value(accepted, "runlens_ingest_records_accepted_total", **events) == 19
    rejected = parsed["runlens_ingest_records_rejected"]
    assert value(rejected, "runlens_ingest_records_rejected_total", **events) == 3
    stored = parsed["runlens_ingest_items_stored"]
    assert value(stored, "runlens_ingest_items_stored_total", **events) == 15
    traces = {"endpoint": "/v1/traces"}
    assert value(stored, "runlens_ingest_items_stored_total", **traces) == 7
    assert value(parsed["runlens_ingest_backlog"], "runlens_ingest_backlog") == 1
    oldest = value(
        parsed["runlens_ingest_oldest_pending_seconds"], "runlens_ingest_oldest_pending_seconds"
    )
    assert 25 <= oldest <= 60
    assert value(parsed["runlens_runs_orphaned"], "runlens_runs_orphaned") == 1


def test_hostile_slugs_come_back_exactly_through_both_parsers(client, world):
    labels = {"project": "acme", "slug": HOSTILE}
    text = client.get("/metrics").content.decode()
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    om = client.get("/metrics", **OPENMETRICS)
    assert om["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.content.decode().endswith("# EOF\n")
    for parsed in (
        families(text, text_families),
        families(om.content.decode(), openmetrics_families),
    ):
        assert value(parsed["runlens_run_tokens_in"], "runlens_run_tokens_in", **labels) == 3000
        assert value(parsed["runlens_run_tokens_out"], "runlens_run_tokens_out", **labels) == 60
        cost = value(parsed["runlens_run_cost_usd"], "runlens_run_cost_usd", **labels)
        assert cost == pytest.approx(1.35)
        runs = parsed["runlens_runs"]
        assert value(runs, "runlens_runs", **labels, status="succeeded") == 3
        assert value(runs, "runlens_runs", project="quotes", slug="plain", status="running") == 1


def test_openmetrics_names_counters_by_their_family(client, world):
    text = client.get("/metrics", **OPENMETRICS).content.decode()
    assert "# TYPE runlens_ingest_batches counter" in text
    assert "runlens_ingest_batches_total{" in text
    plain = client.get("/metrics").content.decode()
    assert "# TYPE runlens_ingest_batches_total counter" in plain
    parsed = families(text, openmetrics_families)
    assert parsed["runlens_ingest_batches"].type == "counter"
    assert parsed["runlens_run_duration_seconds"].type == "histogram"


def buckets(family, **labels) -> list[tuple[float, float]]:
    return [
        (float(s.labels["le"]), s.value)
        for s in family.samples
        if s.name.endswith("_bucket") and {k: v for k, v in s.labels.items() if k != "le"} == labels
    ]


def test_histograms_are_cumulative_and_end_at_the_count(client, world):
    parsed = families(client.get("/metrics", **OPENMETRICS).content.decode(), openmetrics_families)
    durations = parsed["runlens_run_duration_seconds"]
    labels = {"project": "acme", "slug": HOSTILE}
    found = buckets(durations, **labels)
    bounds = [b for b, _ in found]
    counts = [n for _, n in found]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert counts == sorted(counts)
    assert dict(found)[1.0] == 1 and dict(found)[5.0] == 2 and dict(found)[60.0] == 2
    assert counts[-1] == 3
    assert value(durations, "runlens_run_duration_seconds_count", **labels) == 3
    assert value(durations, "runlens_run_duration_seconds_sum", **labels) == pytest.approx(94.5)

    latency = parsed["runlens_ingest_batch_latency_seconds"]
    events = {"endpoint": "/api/ingest/events"}
    found = dict(buckets(latency, **events))
    assert found[0.1] == 0 and found[0.25] == 1 and found[2.5] == 1 and found[5.0] == 2
    assert found[float("inf")] == 2
    latency_sum = value(latency, "runlens_ingest_batch_latency_seconds_sum", **events)
    assert latency_sum == pytest.approx(3.2, abs=0.01)


def test_counters_keep_counting_across_scrapes(client, world):
    def stored() -> float:
        text = client.get("/metrics", **OPENMETRICS).content.decode()
        family = families(text, openmetrics_families)["runlens_ingest_items_stored"]
        return value(family, "runlens_ingest_items_stored_total", endpoint="/api/ingest/events")

    assert stored() == 15
    assert prometheus.ingest_totals.settled_id > 0  # old batches are now read only once
    assert stored() == 15
    pending = IngestBatch.objects.get(state="pending")
    IngestBatch.objects.filter(pk=pending.pk).update(
        state="done", processed_at=timezone.now(), summary={"accepted": 4, "stored": 4}
    )
    assert stored() == 19
    batch(world, accepted=1, stored=1, age=timedelta(seconds=1))
    assert stored() == 20


def test_a_scrape_takes_a_fixed_number_of_queries(client, world, django_assert_max_num_queries):
    for i in range(30):
        Run.objects.create(project=world, run_id=f"more{i}", slug=f"slug-{i}", duration_ms=10)
    with django_assert_max_num_queries(8):
        client.get("/metrics")


def test_it_needs_the_token_once_one_is_set(client, world, settings, operator):
    settings.METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert response.status_code == 200
    client.force_login(operator)
    assert client.get("/metrics").status_code == 200


def test_without_a_token_only_this_machine_or_an_operator_may_read(client, world, operator):
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    far = client.get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert far.status_code == 401
    assert "METRICS_TOKEN" in far.json()["detail"]
    client.force_login(operator)
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 200


def test_an_empty_installation_is_still_valid_openmetrics(client, db):
    text = client.get("/metrics", **OPENMETRICS).content.decode()
    parsed = families(text, openmetrics_families)
    assert value(parsed["runlens_ingest_backlog"], "runlens_ingest_backlog") == 0


def test_hostile_label_values_are_escaped_on_the_wire(client, world):
    # Backslash first, then quote and newline: exactly what both formats specify.
    escaped = 'slug="evil\\"slug\\\\with\\nnewline"'
    for kwargs in ({}, OPENMETRICS):
        lines = client.get("/metrics", **kwargs).content.decode().splitlines()
        assert f'runlens_run_tokens_in{{project="acme",{escaped}}} 3000.0' in lines


def test_openmetrics_names_read_the_same_under_both_escapings(world):
    # The view renders with allow-utf-8 for speed; scrapers expect underscores (the default).
    def render(escaping: str) -> list[bytes]:
        text = openmetrics_exposition.generate_latest(prometheus.registry, escaping=escaping)
        # The one figure that moves between two renders: the oldest pending batch's age.
        return [line for line in text.splitlines() if b"_seconds " not in line]

    utf8 = render(openmetrics_exposition.ALLOWUTF8)
    assert len(utf8) > 50
    assert utf8 == render(openmetrics_exposition.UNDERSCORES)


FAMILIES = {  # the table in docs/operations.md: name (OpenMetrics), type, labels
    "runlens_ingest_batches": ("counter", {"endpoint"}),
    "runlens_ingest_records_accepted": ("counter", {"endpoint"}),
    "runlens_ingest_records_rejected": ("counter", {"endpoint"}),
    "runlens_ingest_items_stored": ("counter", {"endpoint"}),
    "runlens_ingest_batch_latency_seconds": ("histogram", {"endpoint", "le"}),
    "runlens_ingest_backlog": ("gauge", set()),
    "runlens_ingest_backlog_bytes": ("gauge", set()),
    "runlens_ingest_oldest_pending_seconds": ("gauge", set()),
    "runlens_runs_orphaned": ("gauge", set()),
    "runlens_runs": ("gauge", {"project", "slug", "status"}),
    "runlens_run_tokens_in": ("gauge", {"project", "slug"}),
    "runlens_run_tokens_out": ("gauge", {"project", "slug"}),
    "runlens_run_cost_usd": ("gauge", {"project", "slug"}),
    "runlens_run_duration_seconds": ("histogram", {"project", "slug", "le"}),
}


def test_it_exposes_the_documented_families_and_nothing_else(client, world):
    # Our own registry: no process_* or python_gc_* families from the default one.
    parsed = families(client.get("/metrics", **OPENMETRICS).content.decode(), openmetrics_families)
    found = {
        name: (
            family.type,
            set().union(
                *(s.labels for s in family.samples if not s.name.endswith(("_count", "_sum")))
            ),
        )
        for name, family in parsed.items()
    }
    assert found == FAMILIES


def test_prometheus_3s_accept_header_gets_openmetrics(client, world):
    accept = (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,"
        "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,"
        "*/*;q=0.1"
    )
    response = client.get("/metrics", HTTP_ACCEPT=accept)
    assert response["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert "Accept" in response["Vary"]
    parsed = families(response.content.decode(), openmetrics_families)
    assert value(parsed["runlens_ingest_backlog"], "runlens_ingest_backlog") == 1


def test_behind_a_trusted_proxy_the_proxied_client_is_not_this_machine(client, world, settings):
    # A reverse proxy on this host connects from loopback; the address it saw is the client.
    settings.TRUSTED_PROXY_COUNT = 1
    proxied = client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert proxied.status_code == 401
    spoofed = client.get(
        "/metrics", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="127.0.0.1, 203.0.113.9"
    )
    assert spoofed.status_code == 401
    # A Prometheus on this machine scraping the port directly is still this machine.
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
