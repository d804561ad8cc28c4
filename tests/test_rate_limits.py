"""Rate limits: 30 beacons a minute per client address, and per-project ingest limits."""

from __future__ import annotations

import json

import pytest
from django.test import RequestFactory, override_settings

from telemetry import ratelimit
from telemetry.models import ErrorReport, IngestBatch, ProjectLimits, RateCounter
from tests.conftest import ndjson, record

NOW = 1_800_000_000.0 + 15  # 15 s into a minute


class Clock:
    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Time under the test's control: the window must not turn over mid-test by chance."""
    clock = Clock(NOW)
    monkeypatch.setattr(ratelimit, "time", clock)
    return clock


@pytest.fixture
def beacon(client, project, clock):
    body = json.dumps({"message": "boom", "context": {"url": "https://a.example/"}})

    def send(address: str = "192.0.2.10", **headers):
        extra = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()}
        return client.post(
            f"/api/frontend-log?key={project.public_key}",
            body,
            content_type="text/plain",
            REMOTE_ADDR=address,
            **extra,
        )

    return send


# --- The beacon: per client address -----------------------------------------------


def test_thirty_beacons_a_minute_pass_and_the_thirty_first_gets_429(beacon):
    for i in range(30):
        response = beacon()
        assert response.status_code == 202, i
        assert response["X-RateLimit-Limit"] == "30"
        assert response["X-RateLimit-Remaining"] == str(29 - i)
    refused = beacon()
    assert refused.status_code == 429
    # The 30 were sent in the 5-second slot that leaves the sliding minute in 65 s.
    assert refused["Retry-After"] == "65"
    assert (refused["X-RateLimit-Limit"], refused["X-RateLimit-Remaining"]) == ("30", "0")
    assert refused["X-Request-ID"]
    assert "retry after 65 s" in refused.json()["detail"]
    assert ErrorReport.objects.count() == 30


def test_a_spoofed_x_forwarded_for_does_not_reset_the_limit(beacon):
    for i in range(30):
        assert beacon(**{"X-Forwarded-For": f"203.0.113.{i}"}).status_code == 202
    assert beacon(**{"X-Forwarded-For": "203.0.113.200"}).status_code == 429
    assert beacon(**{"X-Forwarded-For": "198.51.100.1, 10.0.0.1"}).status_code == 429
    assert beacon(address="192.0.2.11").status_code == 202  # another client is not limited


@override_settings(TRUSTED_PROXY_COUNT=1)
def test_behind_a_trusted_proxy_the_address_it_saw_is_the_client(beacon):
    proxy = "10.0.0.1"
    for i in range(30):
        # The client makes up the left part; our proxy appends what it saw.
        forwarded = f"203.0.113.{i}, 198.51.100.7"
        assert beacon(address=proxy, **{"X-Forwarded-For": forwarded}).status_code == 202
    spoofed = "203.0.113.250, 198.51.100.7"
    assert beacon(address=proxy, **{"X-Forwarded-For": spoofed}).status_code == 429
    other = "198.51.100.8"
    assert beacon(address=proxy, **{"X-Forwarded-For": other}).status_code == 202


def test_requests_are_let_through_again_once_they_leave_the_sliding_minute(beacon, clock):
    for _ in range(30):
        beacon()
    assert beacon().status_code == 429
    clock.now += 64
    assert beacon().status_code == 429
    clock.now += 1
    assert beacon().status_code == 202


def test_a_burst_at_the_end_of_a_minute_is_not_followed_by_another_at_the_start_of_the_next(
    beacon, clock
):
    clock.now = NOW + 44  # 59 s into the minute
    assert {beacon().status_code for _ in range(30)} == {202}
    clock.now += 2  # 1 s into the next minute: a fixed window would start over here
    refused = beacon()
    assert refused.status_code == 429
    assert refused["Retry-After"] == "59"


def test_no_span_of_sixty_seconds_lets_more_than_the_limit_through(beacon, clock):
    # Three requests every 4 s for five minutes, always more than the 30 a minute.
    passed = []
    for _minute_fifteenth in range(75):
        for _ in range(3):
            if beacon().status_code == 202:
                passed.append(clock.now)
        clock.now += 4
    assert len(passed) >= 5 * 25
    for i, started in enumerate(passed):
        assert len([t for t in passed[i:] if t < started + 60]) <= 30


def test_refused_requests_do_not_count(beacon, clock):
    for _ in range(30):
        beacon()
    for _ in range(100):
        assert beacon().status_code == 429
    clock.now += 65
    assert {beacon().status_code for _ in range(30)} == {202}


@override_settings(FRONTEND_LOG_RATE=2)
def test_the_beacon_rate_is_configurable(beacon):
    assert [beacon().status_code for _ in range(3)] == [202, 202, 429]


@override_settings(FRONTEND_LOG_RATE=0)
def test_a_beacon_rate_of_zero_means_unlimited(beacon):
    assert {beacon().status_code for _ in range(40)} == {202}


def test_counters_live_in_postgresql_and_ended_slots_are_purged(beacon, clock):
    for _ in range(3):
        beacon()
    counter = RateCounter.objects.get()
    assert (counter.key, counter.window_start, counter.hits) == ("beacon:192.0.2.10", NOW, 3)
    assert ratelimit.purge(now=clock.now + 60) == 0  # still in the sliding minute
    assert ratelimit.purge(now=clock.now + 65) == 1


@pytest.mark.parametrize(
    "remote, forwarded, proxies, expected",
    [
        ("192.0.2.1", "198.51.100.1", 0, "192.0.2.1"),
        ("10.0.0.1", "198.51.100.1", 1, "198.51.100.1"),
        ("10.0.0.1", "6.6.6.6, 198.51.100.1", 1, "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.1", 2, "198.51.100.1"),
        ("10.0.0.1", "", 1, "10.0.0.1"),
        ("10.0.0.1", "not-an-ip", 1, "10.0.0.1"),
        ("10.0.0.2", "198.51.100.1", 2, "198.51.100.1"),
    ],
)
def test_the_client_address_trusts_only_the_configured_proxies(
    settings, remote, forwarded, proxies, expected
):
    settings.TRUSTED_PROXY_COUNT = proxies
    request = RequestFactory().get("/", REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)
    assert ratelimit.client_ip(request) == expected


def test_ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4():
    assert ratelimit.ip_key("2001:db8:1:2:aaaa::1") == ratelimit.ip_key("2001:db8:1:2:bbbb::9")
    assert ratelimit.ip_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert ratelimit.ip_key("2001:db8:1:3::1") != ratelimit.ip_key("2001:db8:1:2::1")
    assert ratelimit.ip_key("::ffff:192.0.2.1") == "192.0.2.1"


# --- Token endpoints: per project ---------------------------------------------------


def test_a_project_over_its_ingest_limit_gets_429_with_retry_after(project, post_events, clock):
    ProjectLimits.objects.create(project=project, ingest_per_minute=2)
    body = ndjson(record("tool.call"))
    assert post_events(body, run_id="r").status_code == 202
    assert post_events(body, run_id="r").status_code == 202
    refused = post_events(body, run_id="r")
    assert refused.status_code == 429
    assert (refused["Retry-After"], refused["X-RateLimit-Limit"]) == ("65", "2")
    assert "2 write requests per minute" in refused.json()["detail"]
    assert IngestBatch.objects.count() == 2  # nothing spooled past the limit
    clock.now += 65
    assert post_events(body, run_id="r").status_code == 202


@override_settings(INGEST_RATE_PER_MINUTE=1)
def test_the_default_project_limit_comes_from_the_settings(post_events, clock):
    body = ndjson(record("tool.call"))
    assert [post_events(body, run_id="r").status_code for _ in range(2)] == [202, 429]


@override_settings(INGEST_RATE_PER_MINUTE=1)
def test_a_project_limit_of_zero_means_unlimited(project, post_events, clock):
    ProjectLimits.objects.create(project=project, ingest_per_minute=0)
    body = ndjson(record("tool.call"))
    assert {post_events(body, run_id="r").status_code for _ in range(5)} == {202}


@override_settings(INGEST_RATE_PER_MINUTE=1)
def test_limits_are_per_project_and_reads_do_not_count(client, token, stranger, post_events, clock):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert post_events(ndjson(record("a.b")), run_id="r").status_code == 202
    for _ in range(3):
        assert client.get("/api/runs", **auth).status_code == 200
    heartbeat = client.post("/api/runs/r/heartbeat", {}, content_type="application/json", **auth)
    assert heartbeat.status_code == 429  # every token endpoint counts writes
    their = post_events(ndjson(record("a.b")), run_id="t", auth=stranger[1])
    assert their.status_code == 202


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_never_let_more_than_the_limit_through():
    # Eight connections race for the last places of one key: the current slot's row
    # serialises them, so exactly the limit passes.
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def burst(_: int) -> int:
        try:
            return sum(ratelimit.hit("race", 30, now=NOW).allowed for _ in range(10))
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(burst, range(8))) == 30
