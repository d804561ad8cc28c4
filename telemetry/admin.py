from django.contrib import admin, messages
from django.utils import timezone

from runs.admin import ReadOnlyAdmin
from telemetry.alerts import delivery
from telemetry.alerts.messages import sample_payload
from telemetry.models import (
    AlertChannel,
    AlertRule,
    AlertState,
    ErrorGroup,
    ErrorReport,
    IngestBatch,
    ProjectLimits,
    Span,
)


@admin.register(IngestBatch)
class IngestBatchAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "kind", "state", "attempts", "received_at", "processed_at")
    list_filter = ("state", "kind")
    exclude = ("body",)
    readonly_fields = [f.name for f in IngestBatch._meta.fields if f.name != "body"]
    list_select_related = ("project",)
    actions = ["reenqueue"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Re-enqueue (a failed batch goes back to pending)")
    def reenqueue(self, request, queryset):
        """After a fix: failed batches kept their body, so the worker can store them now."""
        queryset.filter(state=IngestBatch.State.FAILED).update(state=IngestBatch.State.PENDING)
        batches = list(queryset.filter(state=IngestBatch.State.PENDING).defer("body"))
        for batch in batches:
            batch.enqueue()
        skipped = queryset.count() - len(batches)
        note = f"; {skipped} already done, left alone" if skipped else ""
        self.message_user(request, f"{len(batches)} batch(es) enqueued{note}.")


# --- Error groups (triage) and reports --------------------------------------------


@admin.register(ErrorGroup)
class ErrorGroupAdmin(admin.ModelAdmin):
    list_display = (
        "title",
        "culprit",
        "project",
        "level",
        "status",
        "regressed",
        "count",
        "last_seen",
    )
    list_filter = ("status", "regressed", "level", "source", "project")
    search_fields = ("title", "culprit", "fingerprint")
    list_select_related = ("project",)
    ordering = ("-last_seen",)
    # Status changes go through the actions, which keep resolved_at and regressed right.
    readonly_fields = [f.name for f in ErrorGroup._meta.fields]
    actions = ["resolve", "ignore", "reopen"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Resolve (reopens as regressed if seen again)")
    def resolve(self, request, queryset):
        count = queryset.set_status(ErrorGroup.Status.RESOLVED)
        self.message_user(request, f"{count} group(s) resolved.")

    @admin.action(description="Ignore (still counted, never alerts)")
    def ignore(self, request, queryset):
        count = queryset.set_status(ErrorGroup.Status.IGNORED)
        self.message_user(request, f"{count} group(s) ignored.")

    @admin.action(description="Reopen")
    def reopen(self, request, queryset):
        count = queryset.set_status(ErrorGroup.Status.UNRESOLVED)
        self.message_user(request, f"{count} group(s) reopened.")


@admin.register(ErrorReport)
class ErrorReportAdmin(ReadOnlyAdmin):
    """Read-only: a report is evidence, triage happens on its group."""

    list_display = ("id", "group", "source", "level", "received_at", "request_id")
    list_filter = ("source", "level")
    search_fields = ("request_id", "message")
    list_select_related = ("group",)
    raw_id_fields = ("group", "run")


@admin.register(ProjectLimits)
class ProjectLimitsAdmin(admin.ModelAdmin):
    list_display = ("project", "ingest_per_minute")


@admin.register(Span)
class SpanAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "service",
        "trace_id",
        "span_id",
        "status_code",
        "duration_ms",
        "start_time",
    )
    list_filter = ("status_code", "kind", "project")
    search_fields = ("=trace_id", "^name")
    search_help_text = "An exact trace id, or the start of a span name"
    list_select_related = ("project",)
    raw_id_fields = ("run",)
    ordering = ("-id",)


# --- Alerts (docs/alerts.md) ----------------------------------------------------------


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "kind",
        "target",
        "enabled",
        "last_success_at",
        "last_error_at",
        "last_error_status",
    )
    list_filter = ("kind", "enabled")
    search_fields = ("name",)
    readonly_fields = (
        "last_success_at",
        "last_error_at",
        "last_error_status",
        "last_error",
        "hour_start",
        "hour_count",
        "created",
    )
    actions = ["send_test"]

    @admin.action(description="Send a test message now")
    def send_test(self, request, queryset):
        now = timezone.now()
        for channel in queryset:
            answer = delivery.send(channel, sample_payload(now))
            status = answer.status if answer.status is not None else "no answer"
            if answer.ok:
                channel.note_success(now)
                self.message_user(request, f"{channel.name}: {status}", messages.SUCCESS)
            else:
                channel.note_error(now, answer.status, answer.text)
                self.message_user(
                    request, f"{channel.name}: {status}: {answer.text[:300]}", messages.ERROR
                )


class AlertStateInline(admin.TabularInline):
    model = AlertState
    extra = 0
    can_delete = False
    fields = ("subject", "label", "state", "value", "since", "notified", "last_notified_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "project",
        "slug",
        "condition",
        "threshold",
        "window_minutes",
        "cooldown_minutes",
        "enabled",
        "last_fired_at",
        "last_delivery_error",
    )
    list_filter = ("condition", "enabled", "project")
    search_fields = ("name", "slug")
    list_select_related = ("project",)
    filter_horizontal = ("channels",)
    fields = (
        "name",
        "project",
        "slug",
        "condition",
        "threshold",
        "window_minutes",
        "cooldown_minutes",
        "channels",
        "enabled",
        "last_evaluated_at",
        "last_eval_error",
        "last_fired_at",
        "last_delivery_at",
        "last_delivery_error",
    )
    readonly_fields = (
        "last_evaluated_at",
        "last_eval_error",
        "last_fired_at",
        "last_delivery_at",
        "last_delivery_error",
    )
    inlines = [AlertStateInline]

    def save_model(self, request, obj, form, change) -> None:
        if change and {"project", "slug", "condition"} & set(form.changed_data):
            obj.restart()  # it watches something else now: its old states mean nothing
        super().save_model(request, obj, form, change)
