"""Runlens settings: one file, driven by environment variables.

Every variable is listed in `.env.example`. Bad values stop the process at start
with a message naming the variable, rather than misbehaving later.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("RUNLENS_VAR_DIR", BASE_DIR / "var"))

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def parse_database_url(url: str) -> dict:
    """postgres://user:pass@host:port/name?host=/socket/dir -> Django DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must start with postgres:// or postgresql://, got {parts.scheme!r}"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured("DATABASE_URL names no database")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parts.username or "") or query.pop("user", "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or query.pop("host", ""),
        "PORT": str(parts.port or query.pop("port", "")),
        "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": query,
    }


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    # A stable per-installation key, generated once, so sessions survive restarts
    # without anyone having to invent a secret before the first `make run`.
    from portal.embedded import local_secret_key

    SECRET_KEY = local_secret_key(VAR_DIR)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

DATABASE_URL = env_str("DATABASE_URL")
if not DATABASE_URL:
    # No DATABASE_URL: the embedded PostgreSQL under var/pgdata (started if needed).
    from portal.embedded import embedded_database_url

    DATABASE_URL = embedded_database_url(VAR_DIR / "pgdata")
DATABASES = {"default": parse_database_url(DATABASE_URL)}
if env_str("TEST_DATABASE_NAME"):
    # Lets two test runs share one server without dropping each other's database.
    DATABASES["default"]["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME")}
# A read replica (a streaming standby of the same database): pages, read APIs and exports
# read from it; ingest, workers and the admin use the primary (docs/deploy.md). The test
# suite reads the test database through it (MIRROR).
DATABASE_READ_URL = env_str("DATABASE_READ_URL")
if DATABASE_READ_URL:
    DATABASES["replica"] = {
        **parse_database_url(DATABASE_READ_URL),
        "TEST": {"MIRROR": "default"},
    }
DATABASE_ROUTERS = ["portal.db.ReadReplicaRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "django_htmx",
    "template_partials",
    "portal",
    "runs",
    "telemetry",
]

MIDDLEWARE = [
    "portal.middleware.RequestIdMiddleware",
    "portal.middleware.RequestBodyMiddleware",
    "portal.middleware.JsonMethodNotAllowedMiddleware",
    "portal.middleware.RefuseNulInUrlMiddleware",
    "portal.middleware.ReadReplicaMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "portal.middleware.ContentSecurityPolicyMiddleware",
    # Last, so that it sees the exceptions of the views (process_exception).
    "portal.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Only for deployments that run collectstatic; otherwise files come from static/.
STATIC_ROOT = env_str("STATIC_ROOT") or None
# Serve straight from static/ so no collectstatic step is needed to start.
WHITENOISE_USE_FINDERS = True

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# --- Behind a reverse proxy that terminates TLS (docs/deploy.md, deploy/runlens.env) ----
# The proxy says the client came over HTTPS in X-Forwarded-Proto; trust it only when a
# proxy that sets (and overwrites) it stands in front.
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Probes and scrapers call the web process directly over HTTP, past the proxy.
SECURE_REDIRECT_EXEMPT = [r"^health(/|$)", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
# Pages show attacker-controlled agent data: nothing but our own static files may
# run or load, and no inline script or style at all.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)

# --- Celery -----------------------------------------------------------------
# Without CELERY_BROKER_URL the worker uses kombu's filesystem transport under
# var/broker, so `make run` needs no broker server. Set redis:// or amqp:// in
# real deployments.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_IGNORE_RESULT = True
# Keep the worker's database connection across tasks (Celery's Django fixup
# otherwise closes it around every task): a batch should not pay a reconnect.
CELERY_DB_REUSE_MAX = 1000
CELERY_TASK_ACKS_LATE = True  # a worker killed mid-task leaves the message for another
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Ingest -----------------------------------------------------------------
# Limits apply to the decompressed body, cut off while streaming.
# Memory a percentile aggregate may sort in before spilling to disk (per query).
ANALYTICS_WORK_MEM_MB = env_int("ANALYTICS_WORK_MEM_MB", 64, minimum=4)
INGEST_MAX_BYTES = env_int("INGEST_MAX_BYTES", 16 * 1024 * 1024, minimum=1024)
INGEST_MAX_LINE_BYTES = env_int("INGEST_MAX_LINE_BYTES", 1024 * 1024, minimum=256)
INGEST_MAX_ERRORS_REPORTED = 100
ARTIFACT_MAX_BYTES = env_int("ARTIFACT_MAX_BYTES", 20 * 1024 * 1024, minimum=1024)
# OTLP/HTTP (/v1/logs, /v1/metrics, /v1/traces; docs/otlp.md): body limit after
# decompression (413 beyond); attributes naming an item's run and its slug, first
# found wins; longest attribute value kept (longer ones are cut, marked).
OTLP_MAX_BYTES = env_int("OTLP_MAX_BYTES", 16 * 1024 * 1024, minimum=1024)
OTLP_RUN_ATTRIBUTES = env_list("OTLP_RUN_ATTRIBUTES", "run.id,gt.run_id,session.id")
OTLP_SLUG_ATTRIBUTES = env_list("OTLP_SLUG_ATTRIBUTES", "gt.rig,service.name")
OTLP_MAX_ATTRIBUTE_LENGTH = env_int("OTLP_MAX_ATTRIBUTE_LENGTH", 4096, minimum=16)

# --- Runs -------------------------------------------------------------------
ORPHAN_AFTER_SECONDS = env_int("ORPHAN_AFTER_SECONDS", 90, minimum=1)
RETENTION_RUNS_PER_SLUG = env_int("RETENTION_RUNS_PER_SLUG", 20, minimum=1)
RETENTION_MAX_AGE_DAYS = env_int("RETENTION_MAX_AGE_DAYS", 30, minimum=1)
# Events are partitioned by day (runs/partitions.py); beat keeps this many days ahead.
PARTITIONS_AHEAD = env_int("PARTITIONS_AHEAD", 7, minimum=1)
SWEEP_PENDING_AFTER_SECONDS = env_int("SWEEP_PENDING_AFTER_SECONDS", 60, minimum=1)
# The worker stores pending Sentry envelopes several per transaction: at most this
# many, and this much spooled (compressed) body beyond the first (docs/decisions.md).
DRAIN_BATCHES = env_int("DRAIN_BATCHES", 100, minimum=1)
DRAIN_BYTES = env_int("DRAIN_BYTES", 256 * 1024, minimum=1)
# How long a web process gathers committed batches before it wakes a worker for them.
WAKE_DELAY_MS = env_int("WAKE_DELAY_MS", 20, minimum=0)
# Backpressure (docs/reliability.md): spooled bytes waiting for a worker past which
# write requests are refused with Retry-After (503, or 429 for Sentry SDKs), per project
# and for the whole installation, so that a burst can never fill the disk.
BACKLOG_MAX_BYTES_PER_PROJECT = env_int(
    "BACKLOG_MAX_BYTES_PER_PROJECT", 64 * 1024 * 1024, minimum=1
)
BACKLOG_MAX_BYTES = env_int("BACKLOG_MAX_BYTES", 512 * 1024 * 1024, minimum=1)
BACKLOG_RETRY_AFTER_SECONDS = env_int("BACKLOG_RETRY_AFTER_SECONDS", 10, minimum=1)

# --- Front-end beacon, rate limits, error groups -----------------------------
# POST /api/frontend-log: body limit after decompression (413 beyond), and
# requests per minute per client address (429 beyond; 0 = unlimited).
FRONTEND_LOG_MAX_BYTES = env_int("FRONTEND_LOG_MAX_BYTES", 64 * 1024, minimum=1024)
FRONTEND_LOG_RATE = env_int("FRONTEND_LOG_RATE", 30)
# Operator sign-in: failed attempts allowed per sliding 15 minutes, for one user name
# and from one client address; past either, sign-ins get 429 (0 = unlimited).
LOGIN_FAILURES_PER_ACCOUNT = env_int("LOGIN_FAILURES_PER_ACCOUNT", 10)
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 30)
# Slug of the project that beacons without ?key= go to (created on first use);
# empty turns keyless beacons off (403).
FRONTEND_LOG_DEFAULT_PROJECT = env_str("FRONTEND_LOG_DEFAULT_PROJECT", "portal").strip()
# Reverse proxies in front of the portal that append to X-Forwarded-For. 0: the
# client address is REMOTE_ADDR and the header is ignored (it is client-supplied).
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
# Write requests per minute per project on the token endpoints, unless the
# project's limits say otherwise (admin: Project limits). 0 = unlimited.
INGEST_RATE_PER_MINUTE = env_int("INGEST_RATE_PER_MINUTE", 1200)
# The portal's public base URL, as clients reach it: Sentry DSNs and links in alerts
# are built from it. Default: the address `make run` serves.
RUNLENS_URL = env_str("RUNLENS_URL", f"http://127.0.0.1:{env_int('PORT', 8000)}").rstrip("/")
if not RUNLENS_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"RUNLENS_URL must start with http(s)://, got {RUNLENS_URL!r}")
if not CSRF_TRUSTED_ORIGINS and env_str("RUNLENS_URL"):
    # Forms posted from the public address are the portal's own (a proxy may rewrite Host).
    _public = urlsplit(RUNLENS_URL)
    CSRF_TRUSTED_ORIGINS = [f"{_public.scheme}://{_public.netloc}"]
# Sentry envelopes and events (POST /api/<project id>/envelope/ and /store/): body limit
# after decompression (413 beyond).
SENTRY_MAX_BYTES = env_int("SENTRY_MAX_BYTES", 20 * 1024 * 1024, minimum=64 * 1024)
# Error reports: kept this many days, and at most this many (the newest) per group.
ERROR_REPORT_MAX_AGE_DAYS = env_int("ERROR_REPORT_MAX_AGE_DAYS", 30, minimum=1)
ERROR_REPORTS_PER_GROUP = env_int("ERROR_REPORTS_PER_GROUP", 200, minimum=1)

# --- Alerts (docs/alerts.md) -------------------------------------------------
# One delivery attempt waits this long for a receiver; timeouts, 5xx and 429 are
# retried 3 times after ALERT_RETRY_BACKOFF_SECONDS, doubled each time.
ALERT_TIMEOUT_SECONDS = env_int("ALERT_TIMEOUT_SECONDS", 10, minimum=1)
ALERT_RETRY_BACKOFF_SECONDS = env_int("ALERT_RETRY_BACKOFF_SECONDS", 10, minimum=0)
# Email channels: Django's SMTP backend, configured from the environment.
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    raise ImproperlyConfigured("EMAIL_USE_TLS and EMAIL_USE_SSL are exclusive: set one")
EMAIL_TIMEOUT = ALERT_TIMEOUT_SECONDS
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "runlens@localhost")

# --- Logging ----------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG/INFO/WARNING/ERROR, got {LOG_LEVEL!r}")
# One line per request (method, path, status, duration_ms); health checks apart,
# since probes would drown everything else.
LOG_REQUESTS = env_bool("LOG_REQUESTS", False)
LOG_HEALTH_REQUESTS = env_bool("LOG_HEALTH_REQUESTS", False)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "portal.logging.JsonFormatter"}},
    "filters": {"request_id": {"()": "portal.logging.RequestIdFilter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # Celery's per-task lines ("Task … received", "… succeeded in …s") and beat's
        # "Sending due task": two or three INFO lines every 30 s for housekeeping alone,
        # nothing to act on. Failures are ERROR and still show; LOG_LEVEL=DEBUG shows all.
        **{
            name: {"level": "WARNING" if LOG_LEVEL == "INFO" else LOG_LEVEL}
            for name in ("celery.app.trace", "celery.worker.strategy", "celery.beat")
        },
    },
}

# GET /metrics: scrapers send `Authorization: Bearer <METRICS_TOKEN>`. Unset: only
# logged-in operators and requests from this machine (loopback) may read it.
METRICS_TOKEN = env_str("METRICS_TOKEN", "").strip()

RUNLENS_VERSION = "0.1.0"
RUNLENS_COMMIT = env_str("RUNLENS_COMMIT", "")
NINJA_PAGINATION_MAX_LIMIT = 1000
