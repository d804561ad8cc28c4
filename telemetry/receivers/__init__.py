"""The protocols Runlens receives, one module each. Adding one: a module declaring a
`Receiver` (telemetry/ingest/receiver.py) and a line below."""

from __future__ import annotations

from telemetry.receivers import beacon, events, metrics, otlp, sentry

RECEIVERS = {
    receiver.kind: receiver
    for receiver in (
        events.receiver,
        metrics.receiver,
        otlp.logs,
        otlp.metrics,
        otlp.traces,
        sentry.receiver,
        beacon.receiver,
    )
}
