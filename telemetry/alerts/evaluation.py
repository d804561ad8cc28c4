"""The evaluation round: every enabled rule, its condition, its states, its messages.

Run by beat every 30 s (`telemetry.tasks.evaluate_alerts`). One round at a time
(a session advisory lock, released when the round ends or its connection closes):
two beats or a slow round never notify twice.
Per rule and subject: a subject entering the condition fires, unless it was notified
less than the cooldown ago (a flapping condition then fires once the cooldown is
over, if still true); all subjects firing in one round make one message; a
state-like subject leaving the condition sends "resolved" if its firing was sent.
A rule whose condition raises is skipped and its error kept (shown on /alerts); the
others are evaluated as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.db import connection, transaction
from django.utils import timezone

from telemetry.alerts import conditions
from telemetry.alerts.conditions import CONDITIONS, Finding
from telemetry.alerts.messages import Item, payload
from telemetry.models import AlertRule, AlertState

logger = logging.getLogger("runlens.alerts")

# pg_try_advisory_lock key of the round ("RLAL").
ROUND_LOCK = 0x524C414C


@dataclass
class Message:
    rule_id: int
    channel_ids: list[int]
    body: dict


@dataclass
class Round:
    rules: int = 0
    messages: list[Message] = field(default_factory=list)
    failed_rules: list[str] = field(default_factory=list)


def run_round(now: datetime | None = None) -> Round | None:
    """Evaluate every enabled rule once; None when another round holds the lock.

    Conditions only read, outside any transaction: a rule whose read fails costs no
    other rule anything. A rule's state changes are written in a short transaction of
    their own, only when something changed, and its messages handed to the delivery
    task once that commits.
    """
    now = now or timezone.now()
    result = Round()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [ROUND_LOCK])
        if not cursor.fetchone()[0]:
            return None
    try:
        with conditions.one_round():
            rules = (
                AlertRule.objects.filter(enabled=True)
                .select_related("project")
                .prefetch_related("channels", "states")
            )
            evaluated = []
            for rule in rules:
                result.rules += 1
                try:
                    cursor = (rule.cursor, rule.cursor_next)
                    findings = CONDITIONS[rule.condition].check(rule, now)
                    messages = settle(rule, findings, now, cursor)
                except Exception as exc:
                    logger.exception("alert rule %r could not be evaluated", rule.name)
                    result.failed_rules.append(rule.name)
                    AlertRule.objects.filter(pk=rule.pk).update(
                        last_evaluated_at=now, last_eval_error=f"{type(exc).__name__}: {exc}"[:1000]
                    )
                    continue
                result.messages.extend(messages)
                evaluated.append(rule.pk)
            AlertRule.objects.filter(pk__in=evaluated).update(
                last_evaluated_at=now, last_eval_error=""
            )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [ROUND_LOCK])
    return result


def send(messages: list[Message]) -> None:
    # The task module imports this one: looked up once the round has committed.
    from telemetry.tasks import deliver_alert

    for message in messages:
        for channel_id in message.channel_ids:
            try:
                deliver_alert.delay(channel_id, message.rule_id, message.body)
            except Exception:
                # The broker is down: the states say "notified" but nothing went out.
                logger.exception("could not enqueue an alert for channel %s", channel_id)


def settle(
    rule: AlertRule, found: list[Finding], now: datetime, cursor: tuple[int, int]
) -> list[Message]:
    """Compare a rule's findings with its states. What changed is written in one short
    transaction (nothing, most rounds), and its messages go to delivery once it commits."""
    check = CONDITIONS[rule.condition]
    findings: dict[str, Finding] = {}
    for finding in found:
        findings.setdefault(finding.subject, finding)
    states = {state.subject: state for state in rule.states.all()}
    fired: list[Item] = []
    resolved: list[Item] = []
    created: list[AlertState] = []
    changed: list[AlertState] = []
    for subject, finding in findings.items():
        state = states.get(subject)
        if state is None:
            state = AlertState(rule=rule, subject=subject, since=now, updated=now)
            created.append(state)
        before = (state.state, state.label, state.notified)
        if state.state != AlertState.State.FIRING:
            state.state, state.since, state.notified = AlertState.State.FIRING, now, False
        if state.label != finding.text[:300]:
            # The text carries what changed (a count, a spend); a value that moves every
            # round without it (seconds of silence) is not worth a write each round.
            state.label, state.value = finding.text[:300], finding.value
            state.slug, state.path = finding.slug[:200], finding.path[:600]
        quiet = state.last_notified_at is None or now - state.last_notified_at >= rule.cooldown
        if not state.notified and quiet:
            state.notified, state.last_notified_at = True, now
            fired.append(_item(state))
        if state.pk is not None and before != (state.state, state.label, state.notified):
            state.updated = now
            changed.append(state)
    gone: list[int] = []
    for subject, state in states.items():
        if subject in findings:
            continue
        if state.state == AlertState.State.FIRING and not check.resolves:
            gone.append(state.pk)  # a one-off happening: nothing to clear, nothing to send
        elif state.state == AlertState.State.FIRING:
            if state.notified:
                resolved.append(_item(state))
            state.state, state.notified, state.updated = AlertState.State.OK, False, now
            changed.append(state)
        elif state.updated < now - rule.cooldown:
            gone.append(state.pk)  # cleared long enough ago: a new episode notifies anyway

    messages = []
    channels = [c.pk for c in rule.channels.all() if c.enabled]
    for state_name, items in (("firing", fired), ("resolved", resolved)):
        if items:
            items.sort(key=lambda i: (-(i.value or 0), i.subject))
            messages.append(Message(rule.pk, channels, payload(rule, state_name, items, now)))
    moved = (rule.cursor, rule.cursor_next) != cursor
    if not (created or changed or gone or fired or moved):
        return []
    with transaction.atomic():
        if created:
            AlertState.objects.bulk_create(created)
        if changed:
            fields = ["state", "since", "notified", "last_notified_at", "label", "value", "slug"]
            AlertState.objects.bulk_update(changed, [*fields, "path", "updated"])
        if gone:
            AlertState.objects.filter(pk__in=gone).delete()
        if moved:
            # new_error_group moves the rule's cursor as it reads: keep where it got to.
            AlertRule.objects.filter(pk=rule.pk).update(
                cursor=rule.cursor, cursor_next=rule.cursor_next
            )
        if fired:
            AlertRule.objects.filter(pk=rule.pk).update(last_fired_at=now)
        transaction.on_commit(lambda: send(messages))
    if fired:
        logger.warning("alert %r fires for %s subject(s)", rule.name, len(fired))
    if messages and not channels:
        logger.warning("alert %r has no enabled channel: nothing is sent", rule.name)
    return messages


def _item(state: AlertState) -> Item:
    return Item(state.subject, state.label, state.value, state.slug, state.path)
