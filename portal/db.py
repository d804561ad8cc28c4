"""Database access the ORM has no word for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.models import Model


@contextmanager
def server_bound_cursor() -> Iterator[Any]:
    """A cursor on Django's connection (same transaction) whose parameters the
    server binds.

    Django's cursors bind on the client: every parameter is written into the SQL
    text, bytes as hex, which PostgreSQL then parses as a string literal. For a
    spooled body of ~280 KB that cost the server ~4 ms a request; bound, the bytes
    travel as binary and the insert costs ~0.5 ms. Queries are logged and errors
    wrapped as on any Django cursor.
    """
    connection.ensure_connection()
    connection.validate_thread_sharing()
    raw = ServerBindingCursor(connection.connection)
    cursor = (
        connection.make_debug_cursor(raw)
        if connection.queries_logged
        else connection.make_cursor(raw)
    )
    try:
        yield cursor
    finally:
        cursor.close()


def fetch_bytes(sql: str, params: list) -> bytes | None:
    """The first column of the first row, asked for in binary: a bytea column
    comes back as its bytes, not as hex text to decode (half the size on the wire)."""
    with server_bound_cursor() as cursor, connection.wrap_database_errors:
        cursor.cursor.execute(sql, params, binary=True)
        row = cursor.cursor.fetchone()
    return None if row is None else bytes(row[0])


def fetch_all_bytes(sql: str, params: list) -> dict:
    """{first column: bytes of the second} for every row, asked for in binary as in
    fetch_bytes."""
    with server_bound_cursor() as cursor, connection.wrap_database_errors:
        cursor.cursor.execute(sql, params, binary=True)
        return {key: bytes(value) for key, value in cursor.cursor.fetchall()}


def insert_rows(model: type[Model], objs: list[Model]) -> list[Model]:
    """INSERT new instances of `model` in one statement, setting their primary keys.

    What `bulk_create` does, with the rows travelling as one JSON document orjson
    writes in C, read by `jsonb_to_recordset` with each column's type. Django's
    bulk_create sends one array a column, dumped and quoted in Python: ~200 µs a
    row for a wide model such as ErrorReport. Values must be JSON (text, numbers,
    times, JSON fields; Decimals travel as their text): no binary fields.
    """
    if not objs:
        return objs
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    rows = []
    for number, obj in enumerate(objs):
        row = {f.column: f.pre_save(obj, True) for f in fields}
        row["_n"] = number
        rows.append(row)
    qn = connection.ops.quote_name
    columns = ", ".join(qn(f.column) for f in fields)
    types = ", ".join(f"{qn(f.column)} {f.db_type(connection)}" for f in fields)
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({columns})"
        f" SELECT {columns} FROM jsonb_to_recordset(%s::jsonb) AS v({types}, _n int)"
        f" ORDER BY _n RETURNING {qn(meta.pk.column)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [orjson.dumps(rows, default=str).decode()])
        ids = [row[0] for row in cursor.fetchall()]
    for obj, pk in zip(objs, ids, strict=True):
        obj.pk = pk
        obj._state.adding = False
        obj._state.db = connection.alias
    return objs


def safe_text(value: str) -> str:
    """`value` as PostgreSQL text accepts it: NUL removed, lone surrogates replaced."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def copy_text(value: str) -> str:
    """A text field for PostgreSQL's COPY text format (every COPY writer uses this)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return safe_text(value)  # PostgreSQL text holds neither NUL nor lone surrogates


def copy_json(value: Any) -> bytes:
    """A JSON value for COPY text: JSON escapes control characters itself; COPY needs
    its backslashes doubled."""
    return orjson.dumps(value, default=str).replace(b"\\", b"\\\\")


# --- The read replica (DATABASE_READ_URL) -------------------------------------------
# Pages, read APIs and exports read the domain's tables (runs, telemetry) from the
# replica when one is configured; ingest, workers, beat, the admin, sessions and users
# always use the primary. ReadReplicaMiddleware marks the requests that may read from the
# replica; the router (and `read_connection()` for raw SQL) follows that mark.

REPLICA = "replica"
READ_APPS = frozenset({"runs", "telemetry"})
_reading_from_replica: ContextVar[bool] = ContextVar("reading_from_replica", default=False)


def read_alias() -> str:
    """The database alias reads go to here: the replica inside a replica-reading request
    when DATABASE_READ_URL is set, the primary everywhere else."""
    if _reading_from_replica.get() and REPLICA in connections.settings:
        return REPLICA
    return DEFAULT_DB_ALIAS


def read_connection():
    """The connection raw read-only SQL of pages and read APIs runs on."""
    return connections[read_alias()]


@contextmanager
def reading_from_replica() -> Iterator[None]:
    token = _reading_from_replica.set(True)
    try:
        yield
    finally:
        _reading_from_replica.reset(token)


def stream_from_replica(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A streamed export is read after the view (and its middleware) returned: each chunk
    is produced inside the mark again, so the whole export reads from the replica."""
    iterator = iter(chunks)
    while True:
        with reading_from_replica():
            try:
                chunk = next(iterator)
            except StopIteration:
                return
        yield chunk


class ReadReplicaRouter:
    """settings.DATABASE_ROUTERS: reads of runs and telemetry models go where
    `read_alias()` says; every write, and everything else, goes to the primary."""

    def db_for_read(self, model, **hints) -> str | None:
        return read_alias() if model._meta.app_label in READ_APPS else DEFAULT_DB_ALIAS

    def db_for_write(self, model, **hints) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1, obj2, **hints) -> bool:
        return True  # one database seen through two connections

    def allow_migrate(self, db: str, app_label: str, **hints) -> bool:
        return db == DEFAULT_DB_ALIAS
