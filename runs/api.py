"""Run endpoints: heartbeat (write) and the read API with keyset pagination."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

import orjson
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header
from ninja import Field, Path, Query, Router, Schema, Status
from ninja.errors import HttpError
from pydantic import BaseModel, field_validator, model_validator

from portal.api import DetailOut, project_auth, read_auth
from portal.db import safe_text
from portal.http import BodyError, read_body
from runs import search, work_context
from runs.models import (
    LEVELS,
    Artifact,
    Event,
    Project,
    Run,
    artifact_content_type,
    clean_artifact_name,
)

router = Router(tags=["runs"])


def runs_for(request: HttpRequest):
    """The runs the caller may see: its project's with a token, all for an operator."""
    if isinstance(request.auth, Project):
        return Run.objects.filter(project=request.auth)
    return Run.objects.all()


def get_run(request: HttpRequest, run_id: str, project: str = "") -> Run:
    """The newest visible run of that id; `project` (a slug) narrows for operators."""
    runs = runs_for(request)
    if project and not isinstance(request.auth, Project):
        runs = runs.filter(project__slug=project)
    run = runs.filter(run_id=run_id).select_related("parent").order_by("-id").first()
    if run is None:
        raise Http404("run not found")
    return run


def run_json(run: Run, detail: bool = False) -> dict:
    out = {
        "run_id": run.run_id,
        "project": run.project_id,
        "slug": run.slug,
        "kind": run.kind,
        "status": run.status,
        "phase": run.phase,
        "pid": run.pid,
        "host": run.host,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "last_heartbeat": run.last_heartbeat,
        "last_event_at": run.last_event_at,
        "exit_clean": run.exit_clean,
        "exit_code": run.exit_code,
        "tags": run.tags,
        "attributes": run.attributes,
        "counters": {
            "events": run.events_count,
            "errors": run.errors_count,
            "warnings": run.warnings_count,
            "tokens_in": run.tokens_in,
            "tokens_out": run.tokens_out,
            "cost_usd": float(run.cost_usd),
            "duration_ms": run.duration_ms,
        },
    }
    if detail:
        out["parent"] = run.parent.run_id if run.parent else None
        out["forks"] = list(run.forks.order_by("id").values_list("run_id", flat=True)[:100])
        out["artifacts"] = list(
            run.artifacts.listing().values("name", "size", "content_type", "sha256")
        )
    return out


# Path parameters of the write endpoints, with the rules the server enforces in the schema.
RunId = Annotated[str, Path(min_length=1, max_length=128, description="1 to 128 characters")]
ArtifactName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=255,
        pattern=r"^[^/\\\x00-\x1f\x7f]+$",
        description="one path segment: no slashes or control characters, not `.` or `..`",
    ),
]


class HeartbeatIn(BaseModel):
    phase: str = Field("", max_length=64)
    pid: int | None = Field(None, ge=0, lt=2**31)
    host: str = Field("", max_length=255)

    @model_validator(mode="before")
    @classmethod
    def an_object(cls, value: object) -> object:
        # A plain pydantic model, not a ninja Schema: a Schema reads the attributes of
        # any object, so `[false]` or `"str"` passed as a heartbeat of defaults.
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object")
        return value

    @field_validator("phase", "host")
    @classmethod
    def storable(cls, value: str) -> str:
        # PostgreSQL text holds neither NUL nor lone surrogates: say so, as a 400.
        if safe_text(value) != value:
            raise ValueError("must not contain NUL characters or lone surrogates")
        return value


@router.post("/runs/{run_id}/heartbeat", auth=project_auth, summary="Run heartbeat")
def heartbeat(request: HttpRequest, run_id: RunId, payload: HeartbeatIn | None = None):
    """A sign of life from a running agent. Creates the run if its events are still in flight."""
    if payload is None and request.body.strip():
        raise HttpError(400, "the body must be a JSON object")  # `null`: no body is fine
    payload = payload or HeartbeatIn()
    run, _ = Run.objects.get_or_create(project=request.auth, run_id=run_id)
    run.heartbeat(payload.phase, payload.pid, payload.host)
    return {
        "run_id": run.run_id,
        "status": run.status,
        "last_heartbeat": run.last_heartbeat,
    }


class RunFilters(Schema):
    slug: str = ""
    status: Run.Status | None = None
    phase: str = ""
    project: str = Field("", description="project slug (operators only)")
    since: datetime | None = None
    until: datetime | None = None
    q: str = Field("", max_length=200, description="search in run id and slug")
    rig: str = Field("", max_length=200, description="work context: attributes.work_rig")
    bead: str = Field("", max_length=200, description="work context: attributes.work_bead")
    mol: str = Field("", max_length=200, description="work context: attributes.work_mol")
    role: str = Field("", max_length=200, description="work context: attributes['gt.role']")
    agent: str = Field("", max_length=200, description="work context: attributes['gt.agent']")
    cursor: int | None = Field(None, description="next_cursor of the previous page")

    @field_validator("since", "until")
    @classmethod
    def in_utc(cls, value: datetime | None) -> datetime | None:
        # PostgreSQL refuses offsets beyond ±15:59, which Python reads (up to ±23:59):
        # such a time reached the query as sent and failed it with a 500.
        if value is None or value.tzinfo is UTC:
            return value
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("year out of range once in UTC") from None

    limit: int = Field(50, ge=1, le=1000)


@router.get("/runs", auth=read_auth, summary="List runs, newest first")
def list_runs(request: HttpRequest, filters: Query[RunFilters]):
    runs = runs_for(request)
    if filters.project and not isinstance(request.auth, Project):
        runs = runs.filter(project__slug=filters.project)
    if filters.slug:
        runs = runs.filter(slug=filters.slug)
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.phase:
        runs = runs.filter(phase=filters.phase)
    if filters.since:
        runs = runs.filter(started_at__gte=filters.since)
    if filters.until:
        runs = runs.filter(started_at__lt=filters.until)
    if filters.q:
        runs = runs.filter(run_id__icontains=filters.q) | runs.filter(slug__icontains=filters.q)
    # Exact values, `attributes @> {...}`: answered by the GIN index run_attributes_gin.
    runs = work_context.filter_by(runs, "attributes", work_context.wanted(filters.model_dump()))
    if filters.cursor:
        runs = runs.filter(id__lt=filters.cursor)
    page = list(runs.order_by("-id")[: filters.limit + 1])
    more = len(page) > filters.limit
    page = page[: filters.limit]
    return {
        "items": [run_json(run) for run in page],
        "next_cursor": page[-1].id if more else None,
    }


@router.get("/runs/{run_id}", auth=read_auth, summary="One run with counters and lineage")
def run_detail(request: HttpRequest, run_id: str):
    return run_json(get_run(request, run_id), detail=True)


class SearchFilters(Schema):
    q: str = Field(
        ...,
        min_length=1,
        max_length=search.MAX_QUERY,
        description="text to find in event names, messages and data (case-insensitive)",
    )
    project: str = Field("", description="project slug (operators only)")
    slug: str = ""
    level: str = Field("", pattern="^(|debug|info|warn|error)$", description="minimum level")
    event: str = Field("", max_length=200, description="event name prefix, e.g. `llm.`")
    since: datetime | None = Field(None, description="default: 24 hours before `until`")
    until: datetime | None = Field(None, description="default: now")
    cursor: str = Field("", max_length=64, description="next_cursor of the previous page")
    limit: int = Field(50, ge=1, le=500)


class SearchHit(Schema):
    project: str
    run_id: str
    slug: str
    seq: int
    ts: datetime
    level: str
    event: str
    phase: str
    message: str = Field(description=f"the first {search.MESSAGE_PREVIEW} characters")
    url: str = Field(description="the run's timeline at this event, on the portal")


class SearchPage(Schema):
    items: list[SearchHit]
    next_cursor: str | None


@router.get(
    "/events/search",
    auth=read_auth,
    summary="Find events across runs, newest first",
    response={200: SearchPage, 400: dict},
)
def search_events(request: HttpRequest, f: Query[SearchFilters]):
    if isinstance(request.auth, Project):
        projects = [request.auth.pk]
    elif f.project:
        projects = list(Project.objects.filter(slug=f.project).values_list("pk", flat=True))
    else:
        projects = None
    wanted = search.Search(
        q=f.q,
        project_ids=projects,
        slug=f.slug,
        level=f.level,
        event=f.event,
        since=f.since,
        until=f.until,
        cursor=f.cursor,
        limit=f.limit,
    )
    try:
        items, next_cursor = search.search(wanted)
    except search.SearchError as exc:
        raise HttpError(400, str(exc)) from None
    return {"items": items, "next_cursor": next_cursor}


class EventFilters(Schema):
    filter: str = Field("", max_length=200, description="event name prefix, e.g. `llm.`")
    level: str = Field("", pattern="^(|debug|info|warn|error)$", description="minimum level")
    after: int = Field(0, ge=0, description="only events with seq greater than this")
    limit: int | None = Field(None, ge=1, le=10000, description="page size (json: default 500)")
    format: str = Field("json", pattern="^(json|jsonl)$")
    # Work context carried in the event's data (OTLP logs, `run.begin`), exact values.
    rig: str = Field("", max_length=200, description="data.work_rig")
    bead: str = Field("", max_length=200, description="data.work_bead")
    mol: str = Field("", max_length=200, description="data.work_mol")
    role: str = Field("", max_length=200, description="data['gt.role']")
    agent: str = Field("", max_length=200, description="data['gt.agent']")


def _events(run: Run, f: EventFilters):
    events = Event.objects.filter(run_id=run.pk, seq__gt=f.after)
    if f.filter:
        events = events.filter(event__startswith=f.filter)
    if f.level:
        events = events.filter(level__in=LEVELS[LEVELS.index(f.level) :])
    events = work_context.filter_by(events, "data", work_context.wanted(f.model_dump()))
    return events.order_by("seq")


def event_lines(run: Run, f: EventFilters) -> Iterator[bytes]:
    """Every matching event as a Gitoma record line, fetched in keyset pages."""
    after, remaining = f.after, f.limit
    columns = ("seq", "ts", "phase", "level", "event", "data")
    while remaining is None or remaining > 0:
        size = 2000 if remaining is None else min(2000, remaining)
        page = list(_events(run, f).filter(seq__gt=after).values_list(*columns)[:size])
        if not page:
            return
        chunk = []
        for _seq, ts, phase, level, event, data in page:
            record = {
                "ts": ts.isoformat(timespec="milliseconds"),
                "slug": run.slug,
                "phase": phase,
                "level": level,
                "event": event,
                "data": data,
            }
            try:
                chunk.append(orjson.dumps(record))
            except TypeError:
                # JSONB may hold integers wider than 64 bits, which orjson refuses (and
                # the stream used to break off there); the stdlib writes them.
                chunk.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
        yield b"\n".join(chunk) + b"\n"
        after = page[-1][0]
        if remaining is not None:
            remaining -= len(page)


@router.get("/runs/{run_id}/events", auth=read_auth, summary="A run's events in order")
def run_events(request: HttpRequest, run_id: str, f: Query[EventFilters]):
    """`format=jsonl` streams exactly the Gitoma record shape, one per line, for `jq`."""
    run = get_run(request, run_id)
    if f.format == "jsonl":
        response = StreamingHttpResponse(event_lines(run, f), content_type="application/x-ndjson")
        response["Content-Disposition"] = f'inline; filename="{run.pk}.jsonl"'
        return response
    limit = f.limit or 500
    page = list(_events(run, f)[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    items = [
        {
            "seq": e.seq,
            "ts": e.ts,
            "level": e.level,
            "event": e.event,
            "phase": e.phase,
            "message": e.message,
            "data": e.data,
            "request_id": e.request_id,
            "trace_id": e.trace_id,
            "span_id": e.span_id,
            # The portal's price of an unpriced `llm.call`, beside the agent's data.
            "cost_usd": None if e.cost_usd is None else float(e.cost_usd),
        }
        for e in page
    ]
    return {
        "run_id": run.run_id,
        "status": run.status,
        "items": items,
        "next_after": page[-1].seq if more else None,
        "last_seq": page[-1].seq if page else f.after,
    }


class ArtifactOut(Schema):
    run_id: str
    name: str
    size: int
    content_type: str
    sha256: str


_RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The file's bytes as they are. `Content-Type` is recorded (guessed from the "
            "name when absent); `Content-Encoding: gzip` or `deflate` is decompressed first."
        ),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put(
    "/runs/{run_id}/artifacts/{name}",
    auth=project_auth,
    response={201: ArtifactOut, 400: DetailOut, 413: DetailOut, 415: DetailOut},
    openapi_extra=_RAW_BODY,
    summary="Store a run artifact",
)
def put_artifact(request: HttpRequest, run_id: RunId, name: ArtifactName):
    """Store a named file of a run (`diff.patch`, `summary.md`…); a second PUT replaces it.

    Limited to ARTIFACT_MAX_BYTES after decompression (413). Like the heartbeat, it
    creates the run when its events are still on their way.
    """
    try:
        name = clean_artifact_name(name)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    limit = settings.ARTIFACT_MAX_BYTES
    declared = request.headers.get("Content-Length", "")
    encoding = request.headers.get("Content-Encoding", "")
    if declared.isdigit() and int(declared) > limit and not encoding:
        raise HttpError(413, f"artifact larger than {limit} bytes")  # refused unread
    try:
        # Streamed from the socket: Django's DATA_UPLOAD_MAX_MEMORY_SIZE must not decide.
        content = read_body(request, encoding, limit)
    except BodyError as exc:
        detail = exc.message.replace("body", "artifact")
        raise HttpError(exc.status, detail) from None
    ctype = artifact_content_type(request.headers.get("Content-Type", ""), name)
    run, _ = Run.objects.get_or_create(project=request.auth, run_id=run_id)
    artifact = Artifact.store(run, name, content, ctype)
    return Status(
        201,
        {
            "run_id": run.run_id,
            "name": artifact.name,
            "size": artifact.size,
            "content_type": artifact.content_type,
            "sha256": artifact.sha256,
        },
    )


_DOWNLOAD = {
    "responses": {
        "200": {
            "description": "The artifact's bytes with its recorded content type, "
            "`Content-Disposition: attachment`, `ETag` (its SHA-256) and "
            "`X-Content-Type-Options: nosniff`.",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    }
}


@router.get(
    "/runs/{run_id}/artifacts/{name}",
    auth=read_auth,
    response={401: DetailOut, 404: DetailOut},
    openapi_extra=_DOWNLOAD,
    summary="Download a run artifact",
)
def get_artifact(request: HttpRequest, run_id: str, name: str, project: str = ""):
    """The file as it was PUT. Always an attachment, and sandboxed should a browser
    render it anyway: an artifact is agent output, it may be HTML with scripts."""
    run = get_run(request, run_id, project)
    artifact = run.artifacts.filter(name=name).first()
    if artifact is None:
        raise Http404("artifact not found")
    response = HttpResponse(bytes(artifact.content), content_type=artifact.content_type)
    response["Content-Disposition"] = content_disposition_header(True, artifact.name)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["ETag"] = f'"{artifact.sha256}"'
    return response
