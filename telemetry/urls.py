from django.urls import path

from telemetry import alert_views, health, trace_views, views

app_name = "telemetry"

urlpatterns = [
    path("status", health.status_page, name="status"),
    path("alerts", alert_views.alerts, name="alerts"),
    path("errors", views.errors_list, name="errors"),
    path("errors/<int:group_id>", views.error_detail, name="error_detail"),
    path("errors/<int:group_id>/status", views.error_status, name="error_status"),
    path("projects/", views.projects, name="projects"),
    path("traces/<str:trace_id>", trace_views.trace_detail, name="trace"),
    path("traces/<str:trace_id>/spans/<str:span_id>", trace_views.span_detail, name="span"),
    path("spans", trace_views.span_stats, name="spans"),
]
