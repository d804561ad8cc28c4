"""`manage.py alerts import FILE | export | test CHANNEL | evaluate` (docs/alerts.md)."""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from telemetry.alerts import delivery, evaluation, rules_file
from telemetry.alerts.messages import sample_payload
from telemetry.models import AlertChannel


class Command(BaseCommand):
    help = "Alert rules as code: import or export the rules file, test a channel, evaluate now."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        imp = sub.add_parser("import", help="Create or update channels and rules by name.")
        imp.add_argument("file", help="a JSON rules file (SPEC §7a); - reads standard input")
        sub.add_parser("export", help="Print every channel and rule as a rules file.")
        test = sub.add_parser("test", help="Send a test message now and print the answer.")
        test.add_argument("channel", help="the channel's name")
        sub.add_parser("evaluate", help="Run one evaluation round now (what beat does).")

    def handle(self, action: str, **options):
        getattr(self, f"do_{action}")(**options)

    def do_import(self, file: str, **options) -> None:
        try:
            if file == "-":
                text = sys.stdin.read()
            else:
                with open(file, encoding="utf-8") as handle:
                    text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{file} is not JSON: {exc}") from None
        try:
            counts = rules_file.import_rules(data)
        except rules_file.RulesFileError as exc:
            raise CommandError(f"{file}: {exc}; nothing was imported") from None
        self.stdout.write(
            "channels: {channels_created} created, {channels_updated} updated; "
            "rules: {rules_created} created, {rules_updated} updated".format(**counts)
        )

    def do_export(self, **options) -> None:
        self.stdout.write(json.dumps(rules_file.export_rules(), indent=2, ensure_ascii=False))

    def do_test(self, channel: str, **options) -> None:
        found = AlertChannel.objects.filter(name=channel).first()
        if found is None:
            names = ", ".join(AlertChannel.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"no channel named {channel!r} (channels: {names})")
        now = timezone.now()
        answer = delivery.send(found, sample_payload(now))
        status = answer.status if answer.status is not None else "no answer"
        self.stdout.write(f"{found.name} ({found.kind} {found.target}): {status}")
        if answer.text:
            self.stdout.write(answer.text)
        if answer.ok:
            found.note_success(now)
        else:
            found.note_error(now, answer.status, answer.text)
            raise CommandError(f"the test message to {found.name} failed")

    def do_evaluate(self, **options) -> None:
        result = evaluation.run_round()
        if result is None:
            self.stdout.write("another round is running")
            return
        self.stdout.write(f"{result.rules} rule(s) evaluated, {len(result.messages)} message(s)")
        for name in result.failed_rules:
            self.stderr.write(f"rule {name!r} could not be evaluated (see /alerts)")
