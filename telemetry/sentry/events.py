"""Sentry events: the stored shape and the occurrence (placeholder, replaced by sgroup)."""

from __future__ import annotations

from datetime import datetime

from telemetry.errors import Occurrence
from telemetry.ingest.redaction import Scrubber


def normalized(payload: dict) -> dict:
    event = Scrubber(redact=True).walk(dict(payload))
    exc = event.get("exception")
    if isinstance(exc, list):
        event["exception"] = {"values": exc}
    tags = event.get("tags")
    if isinstance(tags, list):
        event["tags"] = {str(p[0]): str(p[1]) for p in tags if isinstance(p, list) and len(p) == 2}
    elif not isinstance(tags, dict):
        event["tags"] = {}
    if isinstance(event.get("event_id"), str):
        event["event_id"] = event["event_id"].replace("-", "").lower()
    return event


def occurrence(
    event: dict, *, received_at: datetime, request_id: str = "", run_id: int | None = None
) -> Occurrence:
    values = (event.get("exception") or {}).get("values") or [{}]
    newest = values[-1] if isinstance(values[-1], dict) else {}
    kind, value = str(newest.get("type") or ""), str(newest.get("value") or "")
    message = event.get("message")
    message = message if isinstance(message, str) else value
    title = f"{kind}: {value}" if kind else message
    return Occurrence(
        source="sentry",
        message=message,
        error=title,
        level="error",
        received_at=received_at,
        request_id=request_id,
        run_id=run_id,
        group_key="\n".join(("sentry", kind, value or message)),
        given_title=title,
        event_id=event["event_id"],
        release=str(event.get("release") or "")[:200],
        environment=str(event.get("environment") or "")[:64],
        event=event,
    )
