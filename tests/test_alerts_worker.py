"""Alert delivery through a real Celery worker (2 processes, as `make run` starts it):
a channel whose receiver hangs does not delay another channel of the same message."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from runs.models import EventCount
from telemetry.alerts.evaluation import run_round
from telemetry.models import AlertChannel, AlertRule
from tests.alert_receiver import start_receiver
from tests.test_worker import celery_worker, real_broker, wait_for  # noqa: F401  (fixture)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

TIMEOUT_S = 2


@pytest.fixture
def alert_worker(real_broker, tmp_path):  # noqa: F811
    with celery_worker(
        tmp_path,
        "--concurrency",
        "2",
        ALERT_TIMEOUT_SECONDS=str(TIMEOUT_S),
        ALERT_RETRY_BACKOFF_SECONDS="600",  # no retry within the test
    ) as proc:
        yield proc


@pytest.fixture
def receivers():
    slow, fast = start_receiver(), start_receiver()
    yield slow, fast
    for receiver in (slow, fast):
        receiver.server.shutdown()
        receiver.server.server_close()


def test_a_channel_that_times_out_does_not_delay_another(
    alert_worker, receivers, project, tmp_path
):
    slow, fast = receivers
    slow.script = [(200, "too late", 30)]
    hanging = AlertChannel.objects.create(name="a-hanging", kind="webhook", url=slow.url)
    quick = AlertChannel.objects.create(name="b-quick", kind="webhook", url=fast.url)
    rule = AlertRule.objects.create(
        name="error spike",
        project=project,
        condition="error_events",
        threshold=50,
        window_minutes=5,
    )
    rule.channels.set([hanging, quick])
    now = timezone.now()
    EventCount.objects.create(
        project=project, minute=now.replace(second=0, microsecond=0), errors=60
    )

    # Wait until the worker takes tasks: its start is not what is measured.
    assert wait_for(lambda: alert_worker.poll() is None and _worker_ready(tmp_path), 30)
    started = time.monotonic()
    run_round(now)  # commits, then sends one task per channel through Redis
    assert fast.wait(1, timeout=TIMEOUT_S * 5), "the quick channel got nothing"
    assert slow.wait(1, timeout=5)
    quick_after = fast.received[0].at - started
    assert quick_after < TIMEOUT_S, f"the quick channel waited {quick_after:.1f} s"

    assert wait_for(lambda: _error_of(hanging) is not None, timeout=TIMEOUT_S * 5)
    assert _error_of(hanging) == f"no answer within {TIMEOUT_S} s"
    quick.refresh_from_db()
    assert quick.last_success_at is not None and quick.last_error_at is None


def _error_of(channel: AlertChannel) -> str | None:
    channel.refresh_from_db()
    return channel.last_error or None


def _worker_ready(log_dir) -> bool:
    # Remote control is off (docs/deploy.md), so no ping: the worker's own "ready" line.
    return "ready." in (log_dir / "worker.log").read_text()
