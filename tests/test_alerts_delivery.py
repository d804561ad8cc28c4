"""Alert delivery to real receivers on loopback and Django's mail outbox; the rules
file; the /alerts page."""

from __future__ import annotations

import json

import pytest
from django.contrib.messages import get_messages
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from portal.celery import app as celery_app
from telemetry.alerts.messages import sample_payload
from telemetry.models import AlertChannel, AlertRule, AlertState
from telemetry.tasks import deliver_alert
from tests.alert_receiver import running_receiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver():
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture(autouse=True)
def eager_retries():
    """Eager tasks run their retries at once (Celery does so only when eager tasks do
    not propagate their exceptions); the backoff is set to 0 where a test retries."""
    celery_app.conf.task_eager_propagates = False
    yield
    celery_app.conf.task_eager_propagates = True


@pytest.fixture
def rule(project) -> AlertRule:
    return AlertRule.objects.create(
        name="error spike",
        project=project,
        condition="error_events",
        threshold=50,
        window_minutes=5,
    )


def channel(kind: str = "webhook", **fields) -> AlertChannel:
    return AlertChannel.objects.create(name=fields.pop("name", kind), kind=kind, **fields)


def body(text: str = "[Runlens] error spike: acme: 60 error events") -> dict:
    return {**sample_payload(timezone.now()), "text": text}


# --- Retries and final errors ----------------------------------------------------------


def test_a_receiver_that_fails_twice_then_answers_gets_the_message_on_the_third_try(
    receiver, rule, settings
):
    settings.ALERT_RETRY_BACKOFF_SECONDS = 0
    receiver.script = [(503, "busy", 0), (502, "<h1>bad gateway</h1>", 0)]
    hook = channel(url=receiver.url)
    deliver_alert.delay(hook.pk, rule.pk, body())
    assert receiver.wait(3)
    assert len(receiver.received) == 3
    assert all(r.json["text"] == body()["text"] for r in receiver.received)
    hook.refresh_from_db()
    rule.refresh_from_db()
    assert hook.last_success_at is not None and hook.last_success_at >= hook.last_error_at
    assert (hook.last_error_status, hook.last_error) == (502, "<h1>bad gateway</h1>")
    assert hook.healthy
    assert rule.last_delivery_error == ""


def test_after_three_retries_the_last_error_is_kept_on_the_channel_and_the_rule(
    receiver, rule, settings
):
    settings.ALERT_RETRY_BACKOFF_SECONDS = 0
    receiver.script = [(500, "down " + "x" * 3000, 0)] * 4
    hook = channel(url=receiver.url)
    deliver_alert.delay(hook.pk, rule.pk, body())
    assert receiver.wait(4)
    assert len(receiver.received) == 4  # the first try and three retries
    hook.refresh_from_db()
    rule.refresh_from_db()
    assert hook.last_error_status == 500
    assert hook.last_error.startswith("down x") and len(hook.last_error) == 1024
    assert hook.last_success_at is None and not hook.healthy
    assert rule.last_delivery_error.startswith("webhook: 500: down x")
    assert rule.last_delivery_error.endswith("(attempt 4, gave up)")


def test_a_4xx_answer_is_final(receiver, rule, settings):
    settings.ALERT_RETRY_BACKOFF_SECONDS = 0
    receiver.script = [(404, "no such hook", 0)]
    hook = channel(url=receiver.url)
    deliver_alert.delay(hook.pk, rule.pk, body())
    assert len(receiver.received) == 1
    hook.refresh_from_db()
    assert (hook.last_error_status, hook.last_error) == (404, "no such hook")


def test_a_receiver_that_does_not_answer_in_time_is_a_retried_timeout(receiver, rule, settings):
    settings.ALERT_TIMEOUT_SECONDS = 1
    settings.ALERT_RETRY_BACKOFF_SECONDS = 0
    receiver.script = [(200, "late", 3)] * 4
    hook = channel(url=receiver.url)
    deliver_alert.delay(hook.pk, rule.pk, body())
    hook.refresh_from_db()
    assert len(receiver.received) == 4
    assert (hook.last_error_status, hook.last_error) == (None, "no answer within 1 s")


def test_nothing_listening_is_a_retried_connection_error(rule, settings):
    settings.ALERT_RETRY_BACKOFF_SECONDS = 0
    hook = channel(url="http://127.0.0.1:1/hook")
    deliver_alert.delay(hook.pk, rule.pk, body())
    hook.refresh_from_db()
    assert hook.last_error.startswith("could not connect")


def test_a_redirect_is_an_error_not_a_get(receiver, rule):
    receiver.script = [(302, "moved", 0)]
    hook = channel(url=receiver.url)
    deliver_alert.delay(hook.pk, rule.pk, body())
    hook.refresh_from_db()
    assert hook.last_error_status == 302 and len(receiver.received) == 1


def test_the_hourly_cap_drops_messages_beyond_it_and_says_so(receiver, rule):
    hook = channel(url=receiver.url, max_per_hour=2)
    for i in range(3):
        deliver_alert.delay(hook.pk, rule.pk, body(f"message {i}"))
    assert [m["text"] for m in receiver.messages()] == ["message 0", "message 1"]
    hook.refresh_from_db()
    assert hook.last_error.startswith("hourly cap of 2 messages reached; dropped: message 2")


# --- Each kind's shape --------------------------------------------------------------


def test_webhook_headers_are_sent(receiver, rule):
    hook = channel(url=receiver.url, headers={"Authorization": "Bearer s3cret"})
    deliver_alert.delay(hook.pk, rule.pk, body())
    assert receiver.received[0].headers["Authorization"] == "Bearer s3cret"
    assert receiver.received[0].path == "/hook/secret-path"


def test_slack_gets_text_with_its_control_characters_escaped(receiver, rule):
    slack = channel("slack", url=receiver.url)
    deliver_alert.delay(slack.pk, rule.pk, body("boom <!channel> & <http://evil|click>"))
    assert receiver.messages() == [
        {"text": "boom &lt;!channel&gt; &amp; &lt;http://evil|click&gt;"}
    ]


def test_discord_gets_content_and_never_pings(receiver, rule):
    discord = channel("discord", url=receiver.url)
    deliver_alert.delay(discord.pk, rule.pk, body("@everyone " + "x" * 3000))
    (message,) = receiver.messages()
    assert message["allowed_mentions"] == {"parse": []}
    assert message["content"].startswith("@everyone x") and len(message["content"]) == 2000


def test_email_is_a_short_plain_text_message_with_the_link(rule):
    email = channel("email", to="oncall@example.com, lead@example.com")
    deliver_alert.delay(email.pk, rule.pk, body("[Runlens] error spike: acme\nsecond line"))
    (sent,) = mail.outbox
    assert sent.subject == "[Runlens] error spike: acme"
    assert sent.to == ["oncall@example.com", "lead@example.com"]
    assert "http://127.0.0.1:8000/alerts" in sent.body
    email.refresh_from_db()
    assert email.last_success_at is not None


# --- manage.py alerts test / import / export -----------------------------------------


def test_the_test_command_sends_a_message_and_prints_the_answer(receiver, capsys):
    receiver.script = [(200, "received, thanks", 0)]
    channel(name="ops", url=receiver.url)
    call_command("alerts", "test", "ops")
    out = capsys.readouterr().out
    assert "ops (webhook http://127.0.0.1:" in out and ": 200" in out
    assert "received, thanks" in out
    assert receiver.messages()[0]["state"] == "test"


def test_the_test_command_fails_loudly_on_a_failing_channel(receiver, capsys):
    receiver.script = [(403, "invalid_token", 0)]
    channel(name="ops", url=receiver.url)
    with pytest.raises(CommandError, match="the test message to ops failed"):
        call_command("alerts", "test", "ops")
    assert "403" in capsys.readouterr().out
    assert AlertChannel.objects.get().last_error == "invalid_token"
    with pytest.raises(CommandError, match="no channel named 'nope'"):
        call_command("alerts", "test", "nope")


RULES = {
    "channels": [
        {"name": "ops", "kind": "webhook", "url": "https://hooks.example/x", "headers": {}},
        {"name": "mail", "kind": "email", "to": "oncall@example.com"},
    ],
    "rules": [
        {
            "name": "error spike",
            "project": "acme",
            "slug": None,
            "condition": "error_events",
            "threshold": 50,
            "window_minutes": 5,
            "channels": ["ops"],
            "cooldown_minutes": 30,
        },
        {
            "name": "gone quiet",
            "project": "acme",
            "slug": "octocat__hello",
            "condition": "no_runs",
            "window_minutes": 60,
            "channels": ["ops", "mail"],
        },
        {"name": "new issues", "project": "acme", "condition": "new_error_group"},
    ],
}


def write(tmp_path, data) -> str:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_import_is_idempotent_and_updates_by_name(project, tmp_path, capsys):
    call_command("alerts", "import", write(tmp_path, RULES))
    assert "channels: 2 created, 0 updated; rules: 3 created, 0 updated" in capsys.readouterr().out
    call_command("alerts", "import", write(tmp_path, RULES))
    assert "channels: 0 created, 2 updated; rules: 0 created, 3 updated" in capsys.readouterr().out
    assert (AlertChannel.objects.count(), AlertRule.objects.count()) == (2, 3)

    changed = json.loads(json.dumps(RULES))
    changed["rules"][0]["threshold"] = 80
    changed["rules"][0]["channels"] = ["mail"]
    call_command("alerts", "import", write(tmp_path, changed))
    spike = AlertRule.objects.get(name="error spike")
    assert spike.threshold == 80
    assert [c.name for c in spike.channels.all()] == ["mail"]
    assert AlertRule.objects.get(name="gone quiet").slug == "octocat__hello"


def test_export_then_import_round_trips(project, tmp_path, capsys):
    call_command("alerts", "import", write(tmp_path, RULES))
    capsys.readouterr()
    call_command("alerts", "export")
    exported = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in exported["rules"]} == {"error spike", "gone quiet", "new issues"}
    AlertRule.objects.all().delete()
    AlertChannel.objects.all().delete()
    call_command("alerts", "import", write(tmp_path, exported))
    capsys.readouterr()
    call_command("alerts", "export")
    assert json.loads(capsys.readouterr().out) == exported


def test_reimporting_a_rule_with_a_new_condition_forgets_its_states(project, tmp_path):
    call_command("alerts", "import", write(tmp_path, RULES))
    spike = AlertRule.objects.get(name="error spike")
    AlertState.objects.create(rule=spike, subject="project", state="firing")
    call_command("alerts", "import", write(tmp_path, RULES))
    assert AlertState.objects.count() == 1  # nothing it watches changed
    changed = json.loads(json.dumps(RULES))
    changed["rules"][0]["condition"] = "rate_limited"
    call_command("alerts", "import", write(tmp_path, changed))
    assert AlertState.objects.count() == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["rules"][0].update(condition="errors"),
            "rules[0].condition: 'errors' is not a condition; one of error_events",
        ),
        (
            lambda d: d["rules"][0].pop("threshold"),
            "rules[0] (error spike): error_events needs a threshold",
        ),
        (
            lambda d: d["rules"][0].update(project="nope"),
            "rules[0].project: no project with slug 'nope'",
        ),
        (
            lambda d: d["rules"][0].update(channels=["pager"]),
            "rules[0].channels: no channel named 'pager'",
        ),
        (lambda d: d["rules"][0].update(threshold="50"), "rules[0].threshold: must be a number"),
        (
            lambda d: d["rules"][0].update(window_minutes=0),
            "rules[0].window_minutes: must be between 1",
        ),
        (lambda d: d["rules"][0].update(colour="red"), "rules[0]: unknown key 'colour'"),
        (
            lambda d: d["rules"].append(dict(d["rules"][0])),
            "rules[3].name: 'error spike' appears twice",
        ),
        (
            lambda d: d["rules"][0].update(condition="rate_limited", slug="x"),
            "rate_limited is per project: leave slug empty",
        ),
        (
            lambda d: d["channels"][0].update(kind="pager"),
            "channels[0] (ops): kind must be one of webhook",
        ),
        (lambda d: d["channels"][0].pop("url"), "channels[0] (ops): a webhook channel needs `url`"),
        (
            lambda d: d["channels"][1].update(to="not-an-address"),
            "not an email address: 'not-an-address'",
        ),
        (
            lambda d: d["channels"][0].update(headers={"X": "a\r\nInjected: 1"}),
            "`headers` must map names to values",
        ),
        (lambda d: d.update(rules={}), "rules: must be a list"),
    ],
)
def test_a_bad_rules_file_is_refused_with_a_clear_error_and_nothing_imported(
    project, tmp_path, mutate, message
):
    data = json.loads(json.dumps(RULES))
    mutate(data)
    with pytest.raises(CommandError) as error:
        call_command("alerts", "import", write(tmp_path, data))
    assert message in str(error.value)
    assert str(error.value).endswith("nothing was imported")
    assert (AlertChannel.objects.count(), AlertRule.objects.count()) == (0, 0)


def test_a_file_that_is_not_json_or_not_there_is_refused(project, tmp_path):
    with pytest.raises(CommandError, match="is not JSON"):
        call_command("alerts", "import", write(tmp_path, "{rules: ["))
    with pytest.raises(CommandError, match="cannot read"):
        call_command("alerts", "import", str(tmp_path / "missing.json"))
    with pytest.raises(CommandError, match="must hold a JSON object"):
        call_command("alerts", "import", write(tmp_path, "[]"))


# --- The /alerts page ----------------------------------------------------------------


def test_the_alerts_page_needs_a_login(client):
    response = client.get("/alerts")
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_the_alerts_page_shows_state_and_escapes_names_and_answers(operator_client, project):
    hook = channel(
        name="<b>ops</b>",
        url="https://hooks.slack.com/services/T000/B000/SECRETPART",
        last_error_at=timezone.now(),
        last_error_status=500,
        last_error="<script>alert('answer')</script>",
    )
    rule = AlertRule.objects.create(
        name="<img src=x onerror=alert(1)>", project=project, condition="run_failed"
    )
    rule.channels.add(hook)
    AlertState.objects.create(
        rule=rule,
        subject="run:1",
        label="<svg onload=alert(2)> failed",
        state="firing",
        notified=True,
    )
    response = operator_client.get("/alerts")
    page = response.content.decode()
    assert response.status_code == 200
    assert "<script>alert" not in page and "<img src=x" not in page and "<svg onload" not in page
    assert "&lt;script&gt;alert(&#x27;answer&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;svg onload=alert(2)&gt; failed" in page
    assert "&lt;b&gt;ops&lt;/b&gt;" in page
    assert "firing" in page and "500" in page
    assert "SECRETPART" not in page  # a webhook URL's path is its secret
    assert "https://hooks.slack.com" in page


def test_the_alerts_panel_refreshes_as_a_fragment(operator_client, project):
    response = operator_client.get("/alerts", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="alerts-panel")
    assert response.status_code == 200
    assert response.content.decode().lstrip().startswith('<div id="alerts-panel"')
    assert "No alert rule yet" in response.content.decode()


# --- The admin -------------------------------------------------------------------------


def test_the_admin_refuses_a_rule_its_condition_cannot_use(admin_client, project):
    response = admin_client.post(
        "/admin/telemetry/alertrule/add/",
        {
            "name": "spike",
            "project": project.pk,
            "slug": "",
            "condition": "error_events",
            "threshold": "",
            "window_minutes": "5",
            "cooldown_minutes": "30",
            "enabled": "on",
            "states-TOTAL_FORMS": "0",
            "states-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200
    assert "error_events needs a threshold" in response.content.decode()
    assert not AlertRule.objects.exists()


def test_the_admin_lists_rules_with_their_states_and_sends_a_test_message(
    admin_client, project, receiver
):
    hook = channel(name="ops", url=receiver.url)
    rule = AlertRule.objects.create(name="failures", project=project, condition="run_failed")
    rule.channels.add(hook)
    AlertState.objects.create(rule=rule, subject="run:1", label="run r1 failed", state="firing")
    assert "failures" in admin_client.get("/admin/telemetry/alertrule/").content.decode()
    page = admin_client.get(f"/admin/telemetry/alertrule/{rule.pk}/change/").content.decode()
    assert "run r1 failed" in page
    response = admin_client.post(
        "/admin/telemetry/alertchannel/", {"action": "send_test", "_selected_action": [hook.pk]}
    )
    assert [str(m) for m in get_messages(response.wsgi_request)] == ["ops: 200"]
    assert receiver.messages()[0]["state"] == "test"


def test_changing_what_a_rule_watches_in_the_admin_forgets_its_states(admin_client, project):
    rule = AlertRule.objects.create(
        name="spike", project=project, condition="error_events", threshold=5, window_minutes=5
    )
    AlertState.objects.create(rule=rule, subject="project", state="firing")
    response = admin_client.post(
        f"/admin/telemetry/alertrule/{rule.pk}/change/",
        {
            "name": "spike",
            "project": project.pk,
            "slug": "",
            "condition": "rate_limited",
            "threshold": "5",
            "window_minutes": "5",
            "cooldown_minutes": "30",
            "enabled": "on",
            "states-TOTAL_FORMS": "1",
            "states-INITIAL_FORMS": "1",
            "states-0-id": AlertState.objects.get().pk,
            "states-0-rule": rule.pk,
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert not AlertState.objects.exists()
