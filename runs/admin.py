from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from runs.models import Artifact, Event, ModelPrice, Project, ProjectToken, Run, RunMetric
from runs.retention import delete_runs


class ProjectTokenInline(admin.TabularInline):
    model = ProjectToken
    fields = ("prefix", "label", "created", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """For what agents sent: browsed and searched in the admin, never edited there."""

    show_full_result_count = False  # no COUNT(*) of a big table on every page

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "retention_runs_per_slug", "retention_max_age_days", "created")
    readonly_fields = ("public_key", "sentry_dsn", "created")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [ProjectTokenInline]
    actions = ["rotate_token"]

    @admin.display(description="Sentry DSN")
    def sentry_dsn(self, project: Project) -> str:
        """Shown only once the project is saved: its id is part of the DSN."""
        return project.dsn if project.pk else "—"

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            # A new project can ingest at once. Shown once: only the hash is stored.
            token = obj.create_token(label="created in admin")
            self.message_user(
                request,
                f"Ingest token for {obj} (shown only now, copy it): {token}",
                messages.WARNING,
            )

    @admin.action(description="Rotate ingest token (revokes the old ones)")
    def rotate_token(self, request, queryset):
        for project in queryset:
            token = project.rotate_tokens()
            # Shown once: only the hash is stored.
            self.message_user(request, f"New token for {project}: {token}", messages.WARNING)


class ArtifactInline(admin.TabularInline):
    model = Artifact
    fields = ("name", "content_type", "size", "sha256", "created")
    readonly_fields = fields
    extra = 0
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).defer("content")


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "run_id",
        "slug",
        "project",
        "status",
        "phase",
        "started_at",
        "events_count",
        "errors_count",
        "events_link",
    )
    list_filter = ("status", ("slug", admin.AllValuesFieldListFilter), "project")
    search_fields = ("run_id",)
    search_help_text = "Run id (or a part of it)"
    raw_id_fields = ("parent",)
    list_select_related = ("project",)
    inlines = [ArtifactInline]
    actions = ["reset_orphaned", "delete_selected"]

    @admin.display(description="Events")
    def events_link(self, run: Run) -> str:
        url = reverse("admin:runs_event_changelist") + f"?run__id__exact={run.pk}"
        return format_html('<a href="{}">events</a>', url)

    @admin.action(description="Reset orphaned runs (mark cancelled)")
    def reset_orphaned(self, request, queryset):
        count = queryset.filter(status=Run.Status.ORPHANED).update(status=Run.Status.CANCELLED)
        self.message_user(request, f"{count} orphaned run(s) marked cancelled.")

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            func, name, _ = actions["delete_selected"]
            actions[name] = (func, name, "Delete selected runs with their events")
        return actions

    # Events have no database foreign key, so Django's cascade would leave them behind:
    # every delete from the admin (the action and the run's own page) goes through
    # retention's delete_runs, which removes events explicitly, in chunks.
    def delete_queryset(self, request, queryset) -> None:
        delete_runs(list(queryset.values_list("pk", flat=True)))

    def delete_model(self, request, obj: Run) -> None:
        delete_runs([obj.pk])


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    """Read-only: events are the record of what an agent did."""

    list_display = ("id", "run", "seq", "ts", "level", "event", "phase")
    list_filter = ("level",)
    search_fields = ("=run__run_id", "^event")
    search_help_text = "Exact run id, or the start of an event name (llm.)"
    list_select_related = ("run",)
    raw_id_fields = ("run",)
    ordering = ("-id",)


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """The price list that token metrics and llm.call events are priced with."""

    list_display = ("model", "input_per_mtok", "output_per_mtok", "valid_from", "note")
    search_fields = ("model",)
    search_help_text = "Model name or pattern"
    ordering = ("model", "-valid_from")


@admin.register(RunMetric)
class RunMetricAdmin(ReadOnlyAdmin):
    """Read-only: metrics are what agents reported."""

    list_display = ("id", "name", "value", "unit", "run", "project", "recorded_at", "source")
    # No filter on name or unit: their distinct values would be a scan of the whole table.
    list_filter = ("source", "project", ("recorded_at", admin.DateFieldListFilter))
    search_fields = ("^name", "=run__run_id")
    search_help_text = "The start of a metric name, or an exact run id"
    list_select_related = ("run", "project")
    raw_id_fields = ("run",)
    ordering = ("-id",)
