"""`POST /api/ingest/events`: run events as NDJSON (or a JSON array) of Gitoma records."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest

from runs.models import Project, run_id_problem
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.ingest.records import judge_body, parse_body
from telemetry.ingest.store import store_records
from telemetry.models import IngestBatch

CONTENT_TYPES = {
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json",
    "text/plain",
}


class EventsReceiver(Receiver):
    kind = IngestBatch.Kind.EVENTS
    idempotency_prefix = ""

    def max_bytes(self) -> int:
        return settings.INGEST_MAX_BYTES

    def check(self, request: HttpRequest) -> None:
        run_id = request.GET.get("run_id", "")
        if run_id and (problem := run_id_problem(run_id)):
            raise Refusal(400, f"run_id: {problem}")
        content_type = request.content_type or "application/x-ndjson"
        if content_type not in CONTENT_TYPES:
            raise Refusal(
                415, f"unsupported Content-Type {content_type!r}: send application/x-ndjson"
            )

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        if not body.strip():
            raise Refusal(400, "empty body: send one JSON record per line")
        run_id = request.GET.get("run_id", "")
        accepted, rejected, errors = judge_body(
            body, run_id, settings.INGEST_MAX_LINE_BYTES, settings.INGEST_MAX_ERRORS_REPORTED
        )
        summary = {"accepted": accepted, "rejected": rejected, "errors": errors}
        return Verdict(accepted, summary, {"run_id": run_id} if run_id else {})

    def store(self, batch: IngestBatch, body: bytes) -> int:
        # The request's line limit: the worker keeps exactly the lines it accepted.
        pairs, _, _ = parse_body(
            body, batch.params.get("run_id", ""), settings.INGEST_MAX_LINE_BYTES
        )
        return store_records(batch.project, pairs)


receiver = EventsReceiver()
