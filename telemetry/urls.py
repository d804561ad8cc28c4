from django.urls import path

from telemetry import views

app_name = "telemetry"

urlpatterns = [
    path("errors", views.errors_list, name="errors"),
    path("errors/<int:group_id>", views.error_detail, name="error_detail"),
    path("errors/<int:group_id>/status", views.error_status, name="error_status"),
]
