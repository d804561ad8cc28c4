"""Operator pages. Run ids may hold slashes (the shipper's `<slug>/<file stem>`): `path:`."""

from django.urls import path

from runs import views

app_name = "runs"

urlpatterns = [
    path("", views.run_list, name="list"),
    path("compare/", views.compare, name="compare"),
    path("search", views.search_events, name="search"),
    # Not under /metrics: that path is the Prometheus exposition.
    path("insights", views.metrics_dashboard, name="insights"),
    path("run-metrics/<int:pk>", views.run_metrics, name="run_metrics"),
    path("artifacts/<int:pk>/", views.artifact_detail, name="artifact"),
    path("artifacts/<int:pk>/download", views.artifact_download, name="artifact_download"),
    # Before the detail route, whose `path:` would swallow the suffix.
    path("runs/<path:run_id>/events.jsonl", views.run_events_jsonl, name="events_jsonl"),
    path("runs/<path:run_id>", views.run_detail, name="detail"),
]
