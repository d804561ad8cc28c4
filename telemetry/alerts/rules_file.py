"""Rules as code: the JSON file of SPEC §7a, read by `manage.py alerts import` and
written by `alerts export`. Import updates channels and rules by name (never a
duplicate), all or nothing; export writes what import reads, so the two round-trip."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from runs.models import Project
from telemetry.models import CONDITION_KEYS, AlertChannel, AlertRule

CHANNEL_KEYS = {"name", "kind", "url", "to", "headers", "enabled", "max_per_hour"}
RULE_KEYS = {
    "name",
    "project",
    "slug",
    "condition",
    "threshold",
    "window_minutes",
    "channels",
    "cooldown_minutes",
    "enabled",
}
# What makes a rule watch something else: its states start over when these change.
WATCHED = ("project_id", "slug", "condition")


class RulesFileError(ValueError):
    """A rules file that cannot be imported; the message names the place (`rules[2].condition`)."""


def _text(where: str, value: Any, limit: int, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise RulesFileError(f"{where}: must be a non-empty string")
    if len(value) > limit:
        raise RulesFileError(f"{where}: longer than {limit} characters")
    return value.strip()


def _number(where: str, value: Any, integer: bool = False, minimum: float = 0) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RulesFileError(f"{where}: must be a number")
    if integer and value != int(value):
        raise RulesFileError(f"{where}: must be a whole number")
    if value < minimum or value > 10**12:
        raise RulesFileError(f"{where}: must be between {minimum:g} and 10^12")
    return int(value) if integer else float(value)


def _bool(where: str, value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise RulesFileError(f"{where}: must be true or false")
    return value


def _unknown(where: str, item: dict, known: set[str]) -> None:
    extra = sorted(set(item) - known)
    if extra:
        raise RulesFileError(
            f"{where}: unknown key {extra[0]!r}; keys are {', '.join(sorted(known))}"
        )


def _list(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise RulesFileError(f"{key}: must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RulesFileError(f"{key}[{i}]: must be an object")
    return value


def _names(items: list, key: str) -> None:
    seen = set()
    for i, item in enumerate(items):
        name = item.get("name")
        if name in seen:
            raise RulesFileError(f"{key}[{i}].name: {name!r} appears twice in the file")
        seen.add(name)


def import_rules(data: Any) -> dict[str, int]:
    """Create or update the file's channels and rules by name; all or nothing.
    Returns counts: channels/rules created and updated."""
    if not isinstance(data, dict):
        raise RulesFileError(
            'the file must hold a JSON object: {"channels": [...], "rules": [...]}'
        )
    _unknown("the file", data, {"channels", "rules"})
    channels, rules = _list(data, "channels"), _list(data, "rules")
    _names(channels, "channels")
    _names(rules, "rules")
    counts = {"channels_created": 0, "channels_updated": 0, "rules_created": 0, "rules_updated": 0}
    with transaction.atomic():
        for i, item in enumerate(channels):
            created = _import_channel(f"channels[{i}]", item)
            counts["channels_created" if created else "channels_updated"] += 1
        for i, item in enumerate(rules):
            created = _import_rule(f"rules[{i}]", item)
            counts["rules_created" if created else "rules_updated"] += 1
    return counts


def _import_channel(where: str, item: dict) -> bool:
    _unknown(where, item, CHANNEL_KEYS)
    name = _text(f"{where}.name", item.get("name"), 100)
    channel = AlertChannel.objects.filter(name=name).first() or AlertChannel(name=name)
    created = channel.pk is None
    channel.kind = _text(f"{where}.kind", item.get("kind"), 8)
    channel.url = _text(f"{where}.url", item.get("url"), 2000, required=False)
    to = item.get("to")
    if isinstance(to, list):
        to = ", ".join(str(a) for a in to)
    channel.to = _text(f"{where}.to", to, 5000, required=False)
    headers = item.get("headers") or {}
    channel.headers = headers
    channel.enabled = _bool(f"{where}.enabled", item.get("enabled"))
    if "max_per_hour" in item:
        channel.max_per_hour = _number(f"{where}.max_per_hour", item["max_per_hour"], True, 1)
    problem = channel.problem()
    if problem:
        raise RulesFileError(f"{where} ({name}): {problem}")
    channel.save()
    return created


def _import_rule(where: str, item: dict) -> bool:
    _unknown(where, item, RULE_KEYS)
    name = _text(f"{where}.name", item.get("name"), 200)
    project_slug = _text(f"{where}.project", item.get("project"), 100)
    project = Project.objects.filter(slug=project_slug).first()
    if project is None:
        raise RulesFileError(f"{where}.project: no project with slug {project_slug!r}")
    rule = AlertRule.objects.filter(name=name).first() or AlertRule(name=name)
    created = rule.pk is None
    before = {key: getattr(rule, key) for key in WATCHED}
    rule.project = project
    rule.slug = _text(f"{where}.slug", item.get("slug"), 200, required=False)
    condition = item.get("condition")
    if condition not in CONDITION_KEYS:
        known = ", ".join(CONDITION_KEYS)
        raise RulesFileError(f"{where}.condition: {condition!r} is not a condition; one of {known}")
    rule.condition = condition
    rule.threshold = _number(f"{where}.threshold", item.get("threshold"))
    rule.window_minutes = _number(f"{where}.window_minutes", item.get("window_minutes"), True, 1)
    cooldown = item.get("cooldown_minutes", 30)
    rule.cooldown_minutes = _number(f"{where}.cooldown_minutes", cooldown, True, 0)
    rule.enabled = _bool(f"{where}.enabled", item.get("enabled"))
    problem = rule.problem()
    if problem:
        raise RulesFileError(f"{where} ({name}): {problem}")
    names = item.get("channels", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RulesFileError(f"{where}.channels: must be a list of channel names")
    found = {c.name: c for c in AlertChannel.objects.filter(name__in=names)}
    missing = [n for n in names if n not in found]
    if missing:
        raise RulesFileError(f"{where}.channels: no channel named {missing[0]!r}")
    if not created and before != {key: getattr(rule, key) for key in WATCHED}:
        rule.restart()
    rule.save()
    rule.channels.set([found[n] for n in names])
    return created


def export_rules() -> dict:
    """Every channel and rule, in the shape import reads."""
    channels = [
        {
            "name": c.name,
            "kind": c.kind,
            **({"to": c.to} if c.kind == AlertChannel.Kind.EMAIL else {"url": c.url}),
            "headers": c.headers or {},
            "enabled": c.enabled,
            "max_per_hour": c.max_per_hour,
        }
        for c in AlertChannel.objects.order_by("name")
    ]
    rules = [
        {
            "name": r.name,
            "project": r.project.slug,
            "slug": r.slug or None,
            "condition": r.condition,
            "threshold": r.threshold,
            "window_minutes": r.window_minutes,
            "channels": sorted(c.name for c in r.channels.all()),
            "cooldown_minutes": r.cooldown_minutes,
            "enabled": r.enabled,
        }
        for r in AlertRule.objects.select_related("project").prefetch_related("channels")
    ]
    return {"channels": channels, "rules": rules}
