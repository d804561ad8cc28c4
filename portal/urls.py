from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from portal.api import api
from portal.login import ThrottledLoginView
from telemetry import health, otlp_views, prometheus, sentry_views

urlpatterns = [
    path("login/", ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    # Sentry SDKs (plain views, before the API: docs/sentry.md). Slash optional.
    re_path(
        r"^api/(?P<project_id>[0-9]{1,18})/(?P<endpoint>envelope|store)/?$",
        sentry_views.ingest,
        name="sentry",
    ),
    path("api/", api.urls),
    # OTLP/HTTP receivers (plain views: protobuf bodies, streamed; docs/otlp.md).
    path("v1/logs", otlp_views.export_logs, name="otlp_logs"),
    path("v1/metrics", otlp_views.export_metrics, name="otlp_metrics"),
    path("v1/traces", otlp_views.export_traces, name="otlp_traces"),
    # Probes and scrapers (plain views, not the API: docs/operations.md).
    path("health", health.health, name="health"),
    path("health/live", health.live, name="health_live"),
    path("metrics", prometheus.metrics, name="prometheus"),
    path("", include("telemetry.urls")),
    path("", include("runs.urls")),
]
