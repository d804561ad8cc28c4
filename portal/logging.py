"""JSON-lines logging to stdout, with the request id of the current request.

The request id lives in a contextvar: RequestIdMiddleware sets it for a request,
and the Celery signals in portal/celery.py carry it into the tasks that request
started. Lines logged outside either (django.request's "Not Found" is logged by
Django's handler after the middleware returned) find it on the request object
passed in the record's `extra`.
"""

from __future__ import annotations

import contextvars
import logging
from datetime import UTC, datetime

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Record attributes that are not extra fields of a line. `request` is the
# HttpRequest django.request passes along: not JSON, and only its id and path matter.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "request"}


def record_request_id(record: logging.LogRecord) -> str:
    """The request id of a log record: set explicitly, of its request, or of the context."""
    found = getattr(record, "request_id", "")
    if not found:
        request = getattr(record, "request", None)
        found = getattr(request, "request_id", "") or request_id_var.get()
    return found


def housekeeping_level(changed: int) -> int:
    """The level of a periodic task's line: INFO when it changed something, else DEBUG.

    Beat runs housekeeping every 30 s; a line for every idle tick would bury the few
    that say when runs were marked orphaned or data was deleted.
    """
    return logging.INFO if changed else logging.DEBUG


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = record_request_id(record)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": record_request_id(record),
            "msg": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if request is not None and hasattr(request, "path"):
            line["method"] = getattr(request, "method", "")
            line["path"] = request.path
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()
