"""OTLP/HTTP endpoints: `POST /v1/logs`, `/v1/metrics`, `/v1/traces` (docs/otlp.md).

Plain views rather than the ninja API: bodies are protobuf as often as JSON. The
receivers (telemetry/receivers/otlp.py) say how to judge, answer and store them.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from telemetry.ingest import pipeline
from telemetry.ingest.receiver import Refusal
from telemetry.receivers import otlp


def _export(request: HttpRequest, receiver: otlp.OtlpReceiver) -> HttpResponse:
    if request.method != "POST":
        refusal = Refusal(405, f"use POST /v1/{receiver.signal}", {"Allow": "POST"})
        return otlp.status_response(request, refusal)
    return pipeline.accept(request, receiver)


@csrf_exempt
def export_logs(request: HttpRequest) -> HttpResponse:
    """OTLP logs: each record becomes an event of its run."""
    return _export(request, otlp.logs)


@csrf_exempt
def export_metrics(request: HttpRequest) -> HttpResponse:
    """OTLP metrics: each data point becomes a run metric."""
    return _export(request, otlp.metrics)


@csrf_exempt
def export_traces(request: HttpRequest) -> HttpResponse:
    """OTLP traces: each span is stored once, whatever the retries."""
    return _export(request, otlp.traces)
