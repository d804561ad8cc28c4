"""Sentry envelopes (https://develop.sentry.dev/sdk/envelopes/), read item by item.

An envelope is newline-separated: a JSON header line (`event_id`, `dsn`, `sdk`,
`sent_at`), then per item a JSON header (`type` required, `length` optional) and its
payload: `length` bytes when given (a newline may follow), else the rest of the line.
Unknown item types are read like the others and left to the caller to skip: an old
server refusing a new type broke SDK users (sentry-rust #576, sentry-javascript #6701).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

MAX_ITEMS = 1000


class EnvelopeError(ValueError):
    """The envelope cannot be read (400): the message says where."""


@dataclass
class Item:
    type: str
    headers: dict
    payload: bytes

    def json(self) -> dict:
        """The payload as a JSON object, or EnvelopeError."""
        try:
            value = orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise EnvelopeError(f"{self.type} item: payload is not a JSON object")
        return value


@dataclass
class Envelope:
    headers: dict
    items: list[Item] = field(default_factory=list)


def parse(body: bytes) -> Envelope:
    """Every item of an envelope, or EnvelopeError naming the first problem."""
    end = body.find(b"\n")
    line, position = (body, len(body)) if end < 0 else (body[:end], end + 1)
    headers = _json_line(line, "envelope header")
    envelope = Envelope(headers)
    number = 0
    while position < len(body):
        end = body.find(b"\n", position)
        line = body[position:] if end < 0 else body[position:end]
        position = len(body) if end < 0 else end + 1
        if not line.strip():
            continue  # blank lines between items (and a trailing newline) are allowed
        number += 1
        if number > MAX_ITEMS:
            raise EnvelopeError(f"more than {MAX_ITEMS} items in one envelope")
        item_headers = _json_line(line, f"item {number} header")
        kind = item_headers.get("type")
        if not isinstance(kind, str) or not kind:
            raise EnvelopeError(f"item {number} header: `type` is required")
        length = item_headers.get("length")
        if length is None:
            end = body.find(b"\n", position)
            payload = body[position:] if end < 0 else body[position:end]
            position = len(body) if end < 0 else end + 1
        elif type(length) is int and length >= 0:
            if position + length > len(body):
                raise EnvelopeError(
                    f"item {number} ({kind}): length {length} runs past the end of the envelope"
                )
            payload = body[position : position + length]
            position += length
            if body[position : position + 1] == b"\n":
                position += 1
        else:
            raise EnvelopeError(f"item {number} header: `length` must be a whole number")
        envelope.items.append(Item(kind, item_headers, payload))
    return envelope


def _json_line(line: bytes, what: str) -> dict:
    line = line.strip()
    if not line:
        return {}
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise EnvelopeError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError(f"{what} is not a JSON object")
    return value
