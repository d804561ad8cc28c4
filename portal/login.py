"""The operator sign-in, throttled per account and per client address.

Counted in PostgreSQL (telemetry.ratelimit), so every web process sees the same
failures. Only failures count, over a sliding 15 minutes: LOGIN_FAILURES_PER_ACCOUNT
for one user name (whoever tries it), LOGIN_FAILURES_PER_ADDRESS for one client
address (whatever names it tries). Past either, sign-ins are refused with 429 without
checking the password, so guessing goes no further; a success forgives its
account's failures. docs/operations.md has the figures.
"""

from __future__ import annotations

import math

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.core.exceptions import ValidationError

from telemetry import ratelimit

WINDOW = ratelimit.LONG_WINDOW_SECONDS


def _keys(request, username: str) -> list[tuple[str, int]]:
    address = ratelimit.ip_key(ratelimit.client_ip(request))
    return [
        (f"login:user:{username.strip().lower()[:150]}", settings.LOGIN_FAILURES_PER_ACCOUNT),
        (f"login:ip:{address}", settings.LOGIN_FAILURES_PER_ADDRESS),
    ]


class ThrottledAuthenticationForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-ins for this account or from this address: "
        "try again in %(minutes)s minutes.",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        keys = _keys(self.request, username)
        waits = [
            verdict.retry_after
            for key, limit in keys
            if limit > 0 and not (verdict := ratelimit.peek(key, limit, seconds=WINDOW)).allowed
        ]
        if waits:
            minutes = max(1, math.ceil(max(waits) / 60))
            raise ValidationError(
                self.error_messages["throttled"], code="throttled", params={"minutes": minutes}
            )
        try:
            cleaned = super().clean()
        except ValidationError:
            for key, limit in keys:
                ratelimit.hit(key, limit, seconds=WINDOW)  # 0: unlimited, not counted
            raise
        ratelimit.forget(keys[0][0])
        return cleaned

    @property
    def throttled(self) -> bool:
        return any(e.code == "throttled" for e in self.non_field_errors().as_data())


class ThrottledLoginView(LoginView):
    form_class = ThrottledAuthenticationForm

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if form.throttled:
            response.status_code = 429
        return response
