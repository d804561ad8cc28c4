"""The /alerts page: every rule with its state, every channel with its newest delivery."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from portal.pages import page
from telemetry.models import AlertChannel, AlertRule, AlertState


@login_required
def alerts(request: HttpRequest) -> HttpResponse:
    firing = AlertState.objects.filter(state=AlertState.State.FIRING).order_by("-value", "id")
    rules = (
        AlertRule.objects.select_related("project")
        .prefetch_related("channels", Prefetch("states", firing, to_attr="firing_states"))
        .order_by("name")
    )
    context = {
        "rules": list(rules),
        "channels": list(AlertChannel.objects.order_by("name")),
        "now": timezone.now(),
        "runlens_url": settings.RUNLENS_URL,
    }
    return page(request, "telemetry/alerts.html", context, {"alerts-panel": "alerts-panel"})
