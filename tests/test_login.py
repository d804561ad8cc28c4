"""The operator sign-in is throttled per account and per client address (portal/login.py)."""

from __future__ import annotations

import pytest
from django.test import Client

from telemetry import ratelimit
from telemetry.models import RateCounter
from tests.test_rate_limits import Clock

PASSWORD = "correct horse battery"


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock(1_800_000_000.0)
    monkeypatch.setattr(ratelimit, "time", clock)
    return clock


def sign_in(username: str, password: str, address: str = "192.0.2.10"):
    return Client(REMOTE_ADDR=address).post("/login/", {"username": username, "password": password})


def test_twenty_five_wrong_passwords_do_not_end_in_a_sign_in(operator, clock):
    answers = [sign_in("alice", f"guess {i}").status_code for i in range(25)]
    assert answers == [200] * 10 + [429] * 15
    refused = sign_in("alice", PASSWORD)
    assert refused.status_code == 429  # the right password too, while locked
    assert "Too many failed sign-ins" in refused.content.decode()
    assert "try again in 16 minutes" in refused.content.decode()  # 15 and a 5-s slot


def test_an_account_is_locked_whatever_the_address_and_freed_after_fifteen_minutes(operator, clock):
    for i in range(10):
        sign_in("alice", "wrong", address=f"198.51.100.{i}")
    assert sign_in("alice", PASSWORD, address="203.0.113.1").status_code == 429
    clock.now += 15 * 60 + 5
    assert sign_in("alice", PASSWORD, address="203.0.113.1").status_code == 302


def test_one_address_is_locked_whatever_the_names_it_tries(operator, clock):
    for i in range(30):
        assert sign_in(f"user{i}", "wrong").status_code == 200
    assert sign_in("alice", PASSWORD).status_code == 429
    assert sign_in("alice", PASSWORD, address="192.0.2.11").status_code == 302


def test_a_success_forgives_the_accounts_failures(operator, clock):
    for _ in range(9):
        sign_in("alice", "wrong", address="192.0.2.1")
    assert sign_in("alice", PASSWORD, address="192.0.2.2").status_code == 302
    for _ in range(9):
        assert sign_in("alice", "wrong", address="192.0.2.3").status_code == 200
    assert sign_in("alice", PASSWORD, address="192.0.2.4").status_code == 302


def test_failures_are_counted_in_postgresql_and_kept_for_the_window(operator, clock):
    sign_in("Alice", "wrong")
    assert set(RateCounter.objects.values_list("key", flat=True)) == {
        "login:user:alice",
        "login:ip:192.0.2.10",
    }
    assert ratelimit.purge(now=clock.now + 60) == 0  # a minute is not the login window
    assert ratelimit.purge(now=clock.now + 15 * 60 + 5) == 2


def test_the_limits_are_settings_and_zero_means_unlimited(operator, clock, settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 0
    settings.LOGIN_FAILURES_PER_ADDRESS = 0
    assert {sign_in("alice", "wrong").status_code for _ in range(40)} == {200}
    assert sign_in("alice", PASSWORD).status_code == 302
