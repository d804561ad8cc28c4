"""What an alert says: one message per rule, state and round, whatever the number of
subjects in it (docs/alerts.md, "Payload")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.conf import settings

from telemetry.models import AlertRule

# Subjects listed in one message; the rest are counted ("and 12 more").
MAX_SUBJECTS = 20
MAX_TEXT = 3500  # Slack shows up to ~4,000 characters of `text` before cutting


@dataclass
class Item:
    subject: str
    text: str
    value: float | None
    slug: str
    path: str

    def __post_init__(self) -> None:
        if self.value is not None:  # sums come back as Decimal; JSON wants a number
            self.value = int(self.value) if float(self.value).is_integer() else float(self.value)

    @property
    def url(self) -> str:
        return f"{settings.RUNLENS_URL}{self.path}" if self.path else settings.RUNLENS_URL


def alerts_url() -> str:
    return f"{settings.RUNLENS_URL}/alerts"


def payload(rule: AlertRule, state: str, items: list[Item], at: datetime) -> dict:
    """The generic webhook body: `text` first (Slack- and Mattermost-style receivers show
    it), then the fields of SPEC §7a; `subjects` lists every subject of the message and
    the top-level `subject`, `value`, `url` are those of the first."""
    first = items[0]
    shown = items[:MAX_SUBJECTS]
    head = f"[Runlens] RESOLVED {rule.name}" if state == "resolved" else f"[Runlens] {rule.name}"
    if len(items) == 1:
        text = f"{head}: {first.text}"
    else:
        lines = [f"{head}: {len(items)} subjects"] + [f"• {item.text}" for item in shown]
        if len(items) > len(shown):
            lines.append(f"… and {len(items) - len(shown)} more")
        text = "\n".join(lines)
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    text += f"\n{first.url if len(items) == 1 else alerts_url()}"
    return {
        "text": text,
        "rule": rule.name,
        "condition": rule.condition,
        "project": rule.project.slug,
        "slug": rule.slug or first.slug or None,
        "subject": first.subject,
        "value": first.value,
        "threshold": rule.threshold,
        "url": first.url,
        "fired_at": at.isoformat(),
        "state": state,
        "subjects": [
            {"subject": i.subject, "text": i.text, "value": i.value, "slug": i.slug, "url": i.url}
            for i in shown
        ],
        "more": len(items) - len(shown),
    }


def sample_payload(at: datetime) -> dict:
    """What `manage.py alerts test CHANNEL` sends: the shape of a real message."""
    return {
        "text": "[Runlens] test message: this channel receives Runlens alerts\n" + alerts_url(),
        "rule": "test",
        "condition": "test",
        "project": None,
        "slug": None,
        "subject": "test",
        "value": None,
        "threshold": None,
        "url": alerts_url(),
        "fired_at": at.isoformat(),
        "state": "test",
        "subjects": [],
        "more": 0,
    }
