from django.contrib import admin, messages

from runs.models import Project, ProjectToken, Run


class ProjectTokenInline(admin.TabularInline):
    model = ProjectToken
    fields = ("prefix", "label", "created", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "retention_runs_per_slug", "retention_max_age_days", "created")
    readonly_fields = ("public_key",)
    inlines = [ProjectTokenInline]
    actions = ["rotate_token"]

    @admin.action(description="Rotate ingest token (revokes the old ones)")
    def rotate_token(self, request, queryset):
        for project in queryset:
            token = project.rotate_tokens()
            # Shown once: only the hash is stored.
            self.message_user(request, f"New token for {project}: {token}", messages.WARNING)


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ("run_id", "slug", "status", "phase", "started_at", "events_count")
    list_filter = ("status", "project")
    search_fields = ("run_id", "slug")
    raw_id_fields = ("parent",)
    list_select_related = ("project",)
    actions = ["reset_orphaned"]

    @admin.action(description="Reset orphaned runs (mark cancelled)")
    def reset_orphaned(self, request, queryset):
        count = queryset.filter(status=Run.Status.ORPHANED).update(status=Run.Status.CANCELLED)
        self.message_user(request, f"{count} orphaned run(s) marked cancelled.")
