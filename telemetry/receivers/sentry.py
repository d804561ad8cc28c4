"""Sentry SDKs: `POST /api/<project id>/envelope/` and `/store/` (docs/sentry.md).

Pointing an SDK's DSN at Runlens is all it takes. The key comes from `X-Sentry-Auth`,
the `sentry_key` query parameter (browsers, to avoid a CORS preflight) or the
envelope header's `dsn`, and must be the project's public key. The answer is Sentry's:
200 `{"id": "<event id>"}` once the envelope is spooled; 400/401/403/413 with a JSON
`detail`; 429 with `Retry-After` and `X-Sentry-Rate-Limits`; 503 when the database is
down. The worker stores `event` items as error reports, `transaction` items as spans,
and counts every other item type (telemetry/sentry/store.py).
"""

from __future__ import annotations

import re
import uuid

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from runs.models import Project
from telemetry import ratelimit
from telemetry.ingest.cors import allow_origin, origin_allowed
from telemetry.ingest.receiver import Receiver, Refusal, Verdict
from telemetry.models import IngestBatch
from telemetry.sentry import envelope as envelopes
from telemetry.sentry.store import store_envelope, store_envelopes

EXPOSED = "Retry-After, X-Sentry-Rate-Limits"
STORED_TYPES = frozenset({"event", "transaction"})
_AUTH_PAIR = re.compile(r"(\w+)\s*=\s*([^,\s]*)")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class SentryReceiver(Receiver):
    kind = IngestBatch.Kind.SENTRY
    shares_transactions = True  # SDKs send one event a request

    def max_bytes(self) -> int:
        return settings.SENTRY_MAX_BYTES

    def authenticate(self, request: HttpRequest) -> Project:
        request.sentry_origin = ""
        project = Project.by_id(request.sentry_project_id)
        if project is None:
            raise Refusal(403, f"no project with id {request.sentry_project_id}")
        origin = request.headers.get("Origin", "")
        if origin and origin_allowed(request, project, origin):
            request.sentry_origin = origin
        key = request_key(request)
        if key is not None and key != project.public_key:
            raise Refusal(403, "the key is not this project's public key (check the DSN)")
        if key is None and request.sentry_endpoint == "store":
            raise Refusal(401, "send X-Sentry-Auth or ?sentry_key=<public key> (see the DSN)")
        if origin and not request.sentry_origin:
            raise Refusal(403, "origin not allowed for this project")
        request.sentry_key_checked = key is not None
        verdict = ratelimit.hit_project(project.pk)
        if verdict is not None and not verdict.allowed:
            seconds = verdict.retry_after
            raise Refusal(
                429,
                f"rate limit of {verdict.limit} requests per minute for this project exceeded; "
                f"retry after {seconds} s",
                {
                    **verdict.headers(),
                    # Every category, for this project: what SDKs honour before a bare 429.
                    "X-Sentry-Rate-Limits": f"{seconds}::project:quota_exceeded",
                },
            )
        return project

    def judge(self, request: HttpRequest, project: Project, body: bytes) -> Verdict:
        if request.sentry_endpoint == "store":
            event = _json_object(body, "the body")
            event_id = event_id_of(event.get("event_id"))
            summary = {"id": event_id, "items": {"event": 1}}
            params = {"store": True, "event_id": event_id, "client": client_address(request)}
            return Verdict(1, summary, params)
        if not body.strip():
            raise Refusal(400, "empty envelope")
        try:
            envelope = envelopes.parse(body)
            for item in envelope.items:
                if item.type in STORED_TYPES:
                    item.json()  # refuse a stored item whose payload is not an object
        except envelopes.EnvelopeError as exc:
            raise Refusal(400, str(exc)) from None
        if not request.sentry_key_checked:
            key = dsn_key(envelope.headers.get("dsn"))
            if key is None:
                raise Refusal(401, "send X-Sentry-Auth, ?sentry_key= or a dsn in the envelope")
            if key != project.public_key:
                raise Refusal(403, "the key is not this project's public key (check the DSN)")
        event_id = envelope.headers.get("event_id")
        if event_id is None:
            event_id = next(
                (i.json().get("event_id") for i in envelope.items if i.type in STORED_TYPES),
                None,
            )
        counts: dict[str, int] = {}
        for item in envelope.items:
            counts[item.type[:64]] = counts.get(item.type[:64], 0) + 1
        event_id = event_id_of(event_id)
        # The worker gives an event without an id of its own the id answered here.
        summary = {"id": event_id, "items": counts}
        params = {"event_id": event_id, "client": client_address(request)}
        return Verdict(len(envelope.items), summary, params)

    def answer(self, request: HttpRequest, verdict: Verdict, batch: IngestBatch | None):
        event_id = verdict.summary.get("id") or uuid.uuid4().hex
        return self._respond(request, JsonResponse({"id": event_id}))

    def overloaded(self, reason: str, retry_after: int) -> Refusal:
        # Relay answers 503 when its buffer is full, and SDKs then keep sending every
        # event; a 429 with X-Sentry-Rate-Limits makes them pause for Retry-After.
        return Refusal(
            429,
            f"{reason}; retry after {retry_after} s",
            {
                "Retry-After": str(retry_after),
                "X-Sentry-Rate-Limits": f"{retry_after}::project:backlog",
            },
        )

    def refuse(self, request: HttpRequest, refusal: Refusal) -> HttpResponse:
        response = JsonResponse({"detail": refusal.message}, status=refusal.status)
        for name, value in refusal.headers.items():
            response[name] = value
        return self._respond(request, response)

    def _respond(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        return allow_origin(response, getattr(request, "sentry_origin", ""), EXPOSED)

    def store(self, batch: IngestBatch, body: bytes) -> int:
        return store_envelope(batch, body)

    def store_many(self, batches: list[tuple[IngestBatch, bytes]]) -> list[int]:
        return store_envelopes(batches)


receiver = SentryReceiver()


def request_key(request: HttpRequest) -> str | None:
    """The public key of `X-Sentry-Auth` or `?sentry_key=`, or None when neither says."""
    header = request.headers.get("X-Sentry-Auth", "")
    if header:
        pairs = dict(_AUTH_PAIR.findall(header.removeprefix("Sentry ").strip()))
        if pairs.get("sentry_key"):
            return pairs["sentry_key"]
    return request.GET.get("sentry_key") or None


def client_address(request: HttpRequest) -> str:
    """For events whose user says `ip_address: "{{auto}}"` (browser SDKs): the sender's."""
    return ratelimit.client_ip(request)


def dsn_key(dsn) -> str | None:
    """The public key of a DSN `scheme://<key>[:secret]@host/project`."""
    if not isinstance(dsn, str) or "@" not in dsn:
        return None
    userinfo = dsn.split("://", 1)[-1].split("@", 1)[0]
    return userinfo.split(":", 1)[0] or None


def event_id_of(value) -> str:
    """An event id as Sentry writes it (32 lower-case hex, no dashes), or a new one."""
    if isinstance(value, str):
        text = value.replace("-", "").lower()
        if _HEX32.match(text):
            return text
    return uuid.uuid4().hex


def _json_object(body: bytes, what: str) -> dict:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise Refusal(400, f"{what} is not a JSON object")
    return value
