"""gunicorn's settings as `serve` runs it (`--config python:portal.gunicorn_conf`).

Only a hook: it hands gunicorn's request object to the application's thread, so that
an answer sent before its body was read can close the connection (portal.http,
close_connection) instead of advertising a keep-alive the server then breaks.
"""

from __future__ import annotations

from portal import http


def pre_request(worker, req) -> None:
    http.remember_server_request(req)


def post_request(worker, req, environ, resp) -> None:
    http.remember_server_request(None)
