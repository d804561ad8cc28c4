"""Sending one message to one channel: webhook, Slack, Discord or email.

Each (channel, message) is its own Celery task (`telemetry.tasks.deliver_alert`), so a
receiver that hangs holds one worker slot for at most ALERT_TIMEOUT_SECONDS and never
delays another channel. Timeouts, connection errors, 5xx and 429 are retried (3 times,
with backoff); any other answer is final. Every outcome is kept on the channel (the
newest success; the newest error with its status and the first 1 KB of the answer)
and on the rule, and shown on /alerts and in the admin.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

import orjson
from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from telemetry.models import AlertChannel, AlertRule

logger = logging.getLogger("runlens.alerts")

ANSWER_KEPT = 1024
RETRIES = 3


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt + 1`: ALERT_RETRY_BACKOFF_SECONDS, doubled each time."""
    return settings.ALERT_RETRY_BACKOFF_SECONDS * 2**attempt


USER_AGENT = "Runlens-alerts/1"


@dataclass
class Answer:
    ok: bool
    status: int | None  # HTTP status; None when there was no answer (timeout, refused)
    text: str  # the first 1 KB of the answer, or what went wrong
    retry: bool = False


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured: say so rather than follow with a GET."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(NoRedirects)


def post_json(url: str, body: dict, headers: dict[str, str]) -> Answer:
    request = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        method="POST",
        headers={**headers, "Content-Type": "application/json", "User-Agent": USER_AGENT},
    )
    try:
        with _opener.open(request, timeout=settings.ALERT_TIMEOUT_SECONDS) as response:
            status, text = response.status, _text(response.read(ANSWER_KEPT))
    except urllib.error.HTTPError as exc:
        status, text = exc.code, _text(exc.read(ANSWER_KEPT))
    except TimeoutError:
        return Answer(False, None, f"no answer within {settings.ALERT_TIMEOUT_SECONDS} s", True)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            text = f"no answer within {settings.ALERT_TIMEOUT_SECONDS} s"
        else:
            text = f"could not connect: {reason}"
        return Answer(False, None, text, True)
    except OSError as exc:  # reset in the middle of the answer, and the like
        return Answer(False, None, f"{type(exc).__name__}: {exc}", True)
    return Answer(200 <= status < 300, status, text, status >= 500 or status == 429)


def _text(data: bytes) -> str:
    return data[:ANSWER_KEPT].decode("utf-8", "replace")


def slack_text(text: str) -> str:
    """Slack reads `<…>` as links and mentions (`<!channel>`): error titles are
    attacker-controlled, so its three control characters are escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def send(channel: AlertChannel, body: dict) -> Answer:
    """Send `body` (messages.payload) once, in the channel's shape."""
    kind = channel.kind
    if kind == AlertChannel.Kind.WEBHOOK:
        return post_json(channel.url, body, channel.headers or {})
    if kind == AlertChannel.Kind.SLACK:
        return post_json(channel.url, {"text": slack_text(body["text"])}, channel.headers or {})
    if kind == AlertChannel.Kind.DISCORD:
        # Discord's limit is 2,000 characters; mentions in error titles must not ping.
        content = {"content": body["text"][:2000], "allowed_mentions": {"parse": []}}
        return post_json(channel.url, content, channel.headers or {})
    if kind == AlertChannel.Kind.EMAIL:
        return send_email(channel, body)
    return Answer(False, None, f"unknown channel kind {kind!r}")


def send_email(channel: AlertChannel, body: dict) -> Answer:
    first_line = body["text"].split("\n", 1)[0]
    subject = " ".join(first_line.split())[:200]  # one line: no header injection
    text = f"{body['text']}\n\n--\nRunlens alerts: {body['url']}\n"
    try:
        sent = send_mail(subject, text, settings.DEFAULT_FROM_EMAIL, channel.recipients())
    except smtplib.SMTPResponseException as exc:
        # SMTP's 4xx are the temporary ones.
        message = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        return Answer(False, exc.smtp_code, message[:ANSWER_KEPT], 400 <= exc.smtp_code < 500)
    except smtplib.SMTPRecipientsRefused as exc:
        return Answer(False, None, f"recipients refused: {exc.recipients}"[:ANSWER_KEPT])
    except (OSError, smtplib.SMTPException) as exc:
        return Answer(False, None, f"{type(exc).__name__}: {exc}"[:ANSWER_KEPT], True)
    return Answer(sent > 0, 250 if sent else None, f"sent to {len(channel.recipients())}")


def deliver(channel_id: int, rule_id: int | None, body: dict, attempt: int, last: bool) -> bool:
    """One attempt of one message to one channel; True when it should be retried.

    The first attempt takes a slot of the channel's hourly cap; retries do not.
    """
    channel = AlertChannel.objects.filter(pk=channel_id, enabled=True).first()
    if channel is None:
        return False  # deleted or disabled since the message was made
    now = timezone.now()
    if attempt == 0 and not channel.take_hourly_slot(now):
        note = f"hourly cap of {channel.max_per_hour} messages reached; dropped: {body['text']}"
        channel.note_error(now, None, note)
        _note_rule(rule_id, now, f"{channel.name}: {note}")
        logger.error("alert channel %r: %s", channel.name, note[:200])
        return False
    try:
        answer = send(channel, body)
    except Exception as exc:  # a defect here must still show on the channel, not only in logs
        logger.exception("alert channel %r: the message could not be sent", channel.name)
        answer = Answer(False, None, f"{type(exc).__name__}: {exc}")
    if answer.ok:
        channel.note_success(now)
        _note_rule(rule_id, now, "")
        return False
    retry = answer.retry and not last
    status = answer.status if answer.status is not None else "no answer"
    tail = (
        f" (attempt {attempt + 1}, will retry)" if retry else f" (attempt {attempt + 1}, gave up)"
    )
    channel.note_error(now, answer.status, answer.text)
    _note_rule(rule_id, now, f"{channel.name}: {status}: {answer.text[:300]}{tail}")
    logger.log(
        logging.WARNING if retry else logging.ERROR,
        "alert channel %r: %s: %s%s",
        channel.name,
        status,
        answer.text[:200],
        tail,
    )
    return retry


def _note_rule(rule_id: int | None, now, error: str) -> None:
    if rule_id is not None:
        AlertRule.objects.filter(pk=rule_id).update(last_delivery_at=now, last_delivery_error=error)
