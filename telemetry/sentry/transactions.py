"""Sentry `transaction` items as spans, in the same tables as OTLP spans.

A transaction is the root span of its trace (`contexts.trace`) and carries its child
spans (`spans`). They become SpanIn items and are stored by the OTLP span writer
(telemetry/otlp/store.py `store_spans`), so one waterfall shows both; a `run_id` tag
names the run they belong to, like OTLP's `run.id` attribute.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from telemetry.otlp.items import Scope, SpanIn

_HEX = re.compile(r"^[0-9a-f]+$")
# OTLP span kinds: 1 internal, 2 server, 3 client.
_KINDS = {"http.server": 2, "http.client": 3, "db": 3, "http": 3}
MAX_SPANS = 1000  # per transaction, as Sentry's own limit


def spans_of(event: dict) -> list[SpanIn]:
    """The root span and the child spans of one transaction event; [] when its trace
    context is missing or malformed (nothing to hang the spans on)."""
    trace = (
        event.get("contexts", {}).get("trace") if isinstance(event.get("contexts"), dict) else None
    )
    if not isinstance(trace, dict):
        return []
    trace_id, root_id = _hex(trace.get("trace_id"), 32), _hex(trace.get("span_id"), 16)
    start, end = _ns(event.get("start_timestamp")), _ns(event.get("timestamp"))
    if not trace_id or not root_id or start is None:
        return []
    end = max(end or start, start)
    tags = _tags(event.get("tags"))
    common = {"run.id": tags["run_id"]} if tags.get("run_id") else {}
    sdk = event.get("sdk") if isinstance(event.get("sdk"), dict) else {}
    scope = Scope(
        {
            key: value
            for key, value in (
                (
                    "service.name",
                    tags.get("service")
                    or _text(event.get("server_name"))
                    or _text(event.get("platform"))
                    or "sentry",
                ),
                ("service.version", _text(event.get("release"))),
                ("deployment.environment", _text(event.get("environment"))),
                ("host.name", _text(event.get("server_name"))),
            )
            if value
        },
        _text(sdk.get("name")) or "sentry",
        _text(sdk.get("version")),
        {},
    )
    root = SpanIn(
        scope=scope,
        trace_id=trace_id,
        span_id=root_id,
        parent_span_id=_hex(trace.get("parent_span_id"), 16),
        name=_text(event.get("transaction")) or _text(trace.get("op")) or "transaction",
        kind=_KINDS.get(_text(trace.get("op")), 1),
        start_ns=start,
        end_ns=end,
        attrs={**_attrs(trace.get("op"), tags, trace.get("data")), **common},
        dropped=0,
        events=[],
        status_code=_status_code(trace.get("status")),
        status_message=_status_message(trace.get("status")),
    )
    out = [root]
    children = event.get("spans") if isinstance(event.get("spans"), list) else []
    for span in children[:MAX_SPANS]:
        if not isinstance(span, dict):
            continue
        span_id = _hex(span.get("span_id"), 16)
        child_start = _ns(span.get("start_timestamp"))
        if not span_id or child_start is None:
            continue
        op = _text(span.get("op"))
        out.append(
            SpanIn(
                scope=scope,
                trace_id=_hex(span.get("trace_id"), 32) or trace_id,
                span_id=span_id,
                parent_span_id=_hex(span.get("parent_span_id"), 16) or root_id,
                name=_text(span.get("description")) or op or "span",
                kind=_KINDS.get(op, 1),
                start_ns=child_start,
                end_ns=max(_ns(span.get("timestamp")) or child_start, child_start),
                attrs={**_attrs(op, _tags(span.get("tags")), span.get("data")), **common},
                dropped=0,
                events=[],
                status_code=_status_code(span.get("status")),
                status_message=_status_message(span.get("status")),
            )
        )
    return out


def _attrs(op: Any, tags: dict, data: Any) -> dict:
    attrs: dict = {}
    if isinstance(data, dict):
        attrs.update(data)
    attrs.update(tags)
    if _text(op):
        attrs["sentry.op"] = _text(op)
    return attrs


def _tags(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, list):
        pairs = [p for p in value if isinstance(p, (list, tuple)) and len(p) == 2]
    else:
        return {}
    return {str(k)[:32]: str(v)[:200] for k, v in pairs if v is not None}


def _status_code(status: Any) -> int:
    if not status:
        return 0
    return 1 if status == "ok" else 2


def _status_message(status: Any) -> str:
    return "" if not status or status == "ok" else _text(status)[:200]


def _hex(value: Any, size: int) -> str:
    if isinstance(value, str):
        value = value.replace("-", "").lower()
        if len(value) == size and _HEX.match(value) and value.strip("0"):
            return value
    return ""


def _ns(value: Any) -> int | None:
    """Epoch seconds (Sentry's float) or RFC 3339 text, as nanoseconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 253_402_300_800:
            return int(round(value * 1e9))
        return None
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return int(at.timestamp() * 1e9) if at.year >= 1970 else None
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
