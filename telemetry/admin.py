from django.contrib import admin

from telemetry.models import IngestBatch


@admin.register(IngestBatch)
class IngestBatchAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "kind", "state", "attempts", "received_at", "processed_at")
    list_filter = ("state", "kind")
    exclude = ("body",)
    readonly_fields = [f.name for f in IngestBatch._meta.fields if f.name != "body"]
    list_select_related = ("project",)

    def has_add_permission(self, request) -> bool:
        return False
