"""OTLP benchmark (SPEC §9): logs and spans over OTLP/HTTP to queryable rows, in one run.

    .venv/bin/python bench/otlp.py [--logs N] [--spans N] [--batch B] [--threads T]

On a dedicated database (`runlens_bench_otlp`, on the server of `DATABASE_URL`, or
the embedded PostgreSQL when that is unset), freshly migrated. The payloads are
made by the real OpenTelemetry SDK (LoggerProvider / TracerProvider with an
in-memory exporter) and encoded by the OTLP exporter's own encoder, in batches
of B (the SDK's batch processors send 512), before any clock starts:

  (b) raw COPY     the log records as the worker would store them (judged, mapped,
                   scrubbed), pre-formatted as COPY text into `runs_event`;
  (l) logs, pb     a real portal (gunicorn + Celery worker, bench/ingest.py's): POST
                   /v1/logs protobuf bodies from T client threads until
                   `count(*) FROM runs_event` is N;
  (j) logs, JSON   the same records as OTLP/JSON bodies;
  (s) spans, pb    POST /v1/traces protobuf bodies until `count(*) FROM telemetry_span`
                   is N (target: >= 15,000 spans/s).

Each phase starts from empty tables after a CHECKPOINT; docs/performance.md says
what the figures mean.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import random
import signal
import sys
from datetime import date
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(ROOT))

from ingest import (  # noqa: E402  (bench/ingest.py: the portal, CPU meters, baselines)
    REDIS_URL,
    EndToEnd,
    Timing,
    django_on,
    drive,
    phase_copy,
    postmaster_pid,
    redis_reachable,
    running_portal,
    server_settings,
    wait_stored,
)

BENCH_DB = "runlens_bench_otlp"
TARGET_SPANS = 15_000  # SPEC §9: spans/s, real SDK exporter -> stored
TABLES = "runs_event, telemetry_span, runs_runmetric, telemetry_ingestbatch, runs_run"
AGENTS = ("Toast", "Shadow", "Furiosa", "Nux", "Slit", "Capable")
EVENTS = ("bd.call", "bd.call", "bd.call", "mail", "sling", "prime", "nudge", "agent.event")


def reset(conn: psycopg.Connection) -> None:
    conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    conn.execute("CHECKPOINT")


# --- Payloads, made and encoded by the SDK -----------------------------------------


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_logs(n: int, batch: int) -> list:
    """Gas Town's recorder output: `emit(body=<event>, attributes)` per polecat session."""
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    rng = random.Random(7)
    requests = []
    per_agent = -(-n // len(AGENTS))
    made = 0
    for agent in AGENTS:
        memory = InMemoryLogRecordExporter()
        resource = Resource.create(
            {
                "service.name": "gastown",
                "service.version": "0.9.1",
                "gt.rig": "gastown",
                "gt.role": f"gastown/polecats/{agent}",
                "gt.agent": agent,
                "gt.run_id": f"run-{agent.lower()}",
            }
        )
        provider = LoggerProvider(resource=resource)
        provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
        logger = provider.get_logger("gastown.telemetry")
        for i in range(min(per_agent, n - made)):
            name = rng.choice(EVENTS)
            attrs = {
                "status": "error" if rng.random() < 0.02 else "ok",
                "work_rig": "gastown",
                "work_bead": f"sg-{i // 50:04x}",
                "work_mol": "mol-polecat-work",
                "duration_ms": round(rng.uniform(1, 900), 2),
            }
            if name == "bd.call":
                attrs["subcommand"] = rng.choice(("show", "update", "list", "close"))
                attrs["args"] = f"bd {attrs['subcommand']} sg-{i:05x} --json"
            elif name == "agent.event":
                attrs["event_type"] = "tool_use"
                attrs["content"] = "Running pytest -q on the changed modules" * 3
            severity = SeverityNumber.ERROR if attrs["status"] == "error" else SeverityNumber.INFO
            logger.emit(body=name, severity_number=severity, attributes=attrs)
            made += 1
        provider.shutdown()
        requests.extend(encode_logs(chunk) for chunk in _chunks(memory.get_finished_logs(), batch))
    return requests


def make_spans(n: int, batch: int) -> list:
    """Code Buddy's agent runs: a root span, LLM calls and tool calls under it."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    rng = random.Random(11)
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "codebuddy", "service.version": "1.4.0"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("codebuddy.agent", "1.4.0")
    made = 0
    while made < n:
        with tracer.start_as_current_span("agent.run", attributes={"repo": "octocat/hello"}):
            made += 1
            for step in range(min(9, n - made)):
                if step % 3 == 0:
                    attrs = {
                        "gen_ai.system": "openai",
                        "gen_ai.request.model": "gpt-4o",
                        "gen_ai.usage.input_tokens": rng.randint(500, 9000),
                        "gen_ai.usage.output_tokens": rng.randint(50, 900),
                        "cost_usd": round(rng.uniform(0.001, 0.05), 5),
                    }
                    name = "llm.call"
                else:
                    attrs = {
                        "tool.name": rng.choice(("bash", "file_read", "file_write", "grep")),
                        "tool.args": "pytest -q tests/test_models.py -k 'not slow'",
                        "exit_code": 0 if rng.random() > 0.05 else 1,
                    }
                    name = "tool.call"
                with tracer.start_as_current_span(name, attributes=attrs) as child:
                    child.add_event("progress", {"step": step})
                made += 1
    provider.shutdown()
    return [encode_spans(chunk) for chunk in _chunks(list(memory.get_finished_spans()), batch)]


def json_body(request) -> bytes:
    """The OTLP/JSON twin of a protobuf request (hex ids, integer enums)."""
    from tests.fixtures.otlp.payloads import to_json

    return orjson.dumps(to_json(request))


def count_items(request) -> int:
    for field, inner, items in (
        ("resource_logs", "scope_logs", "log_records"),
        ("resource_spans", "scope_spans", "spans"),
    ):
        if request.DESCRIPTOR.fields_by_name.get(field):
            return sum(
                len(getattr(sg, items))
                for rg in getattr(request, field)
                for sg in getattr(rg, inner)
            )
    raise ValueError(request)


# --- Phases ---------------------------------------------------------------------------


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple:
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def phase_http(
    portal,
    conn,
    postmaster,
    token: str,
    path: str,
    bodies: list[bytes],
    json: bool,
    table: str,
    total: int,
    threads: int,
) -> EndToEnd:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json" if json else "application/x-protobuf",
    }

    def send(http_conn: http.client.HTTPConnection, body: bytes) -> str | None:
        status, answer = post(http_conn, path, body, headers)
        if status != 200 or answer not in (b"", b"{}"):
            return f"{status}: {answer[:300]!r}"
        return None

    return drive(portal, conn, postmaster, bodies, send, table, total, threads)


def stored_rows(requests: list, project) -> list:
    """The log records as the worker stores them, on runs that exist: the COPY baseline."""
    from django.utils import timezone

    from runs.models import Run
    from telemetry.ingest.records import scrub
    from telemetry.otlp.codec import decode
    from telemetry.otlp.items import LOGS
    from telemetry.otlp.mapping import log_record

    now = timezone.now()
    rows = []
    for request in requests:
        decoded = decode(LOGS, request.SerializeToString(), False)
        rows.extend(log_record(item, now) for item in decoded.items)
    runs = {}
    for rec in rows:
        scrub(None, rec)
        if rec.run_id not in runs:
            runs[rec.run_id] = Run.objects.create(project=project, run_id=rec.run_id, slug=rec.slug)
        rec.run = runs[rec.run_id]
    seqs: dict[str, int] = {}
    for rec in rows:
        rec.seq = seqs[rec.run_id] = seqs.get(rec.run_id, 0) + 1
    return rows


def warm_up(portal, conn, token: str, logs: list, spans: list) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    http_conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
    try:
        for path, request in (("/v1/logs", logs[0]), ("/v1/traces", spans[0])) * 3:
            status, answer = post(http_conn, path, request.SerializeToString(), headers)
            if status != 200:
                raise RuntimeError(f"warm-up refused: {status} {answer[:300]!r}\n{portal.logs()}")
        headers["Content-Type"] = "application/json"
        post(http_conn, "/v1/logs", json_body(logs[0]), headers)
    finally:
        http_conn.close()
    wait_stored(portal, conn)
    reset(conn)


def report(args, results: dict[str, tuple[int, Timing]], server: dict, sizes: dict) -> None:
    cores = os.cpu_count() or 1
    print()
    print(f"Runlens OTLP benchmark, {date.today()}, {platform.node()}")
    print(
        f"  machine: {cores} cores, Python {platform.python_version()}, "
        f"PostgreSQL {server['server_version']}"
    )
    print(
        f"  workload: {args.logs:,} log records ({sizes['pb_log']:.0f} bytes each as protobuf, "
        f"{sizes['json_log']:.0f} as JSON), {args.spans:,} spans ({sizes['pb_span']:.0f} bytes "
        f"each); {args.batch} per request, uncompressed (the SDK default); "
        f"{args.threads} client threads; gunicorn {args.web_workers}x{args.web_threads}, "
        f"celery concurrency {args.concurrency}, broker {args.broker_name}"
    )
    print()
    print(f"  {'path':40s} {'seconds':>8s} {'rows/s':>10s}   CPU s per 100k rows")
    noisy = []
    for label, (n, t) in results.items():
        spent = ", ".join(f"{k} {v / n * 1e5:.2f}" for k, v in t.cpu.items())
        busy = sum(t.cpu.values()) / (t.seconds * cores)
        print(f"  {label:40s} {t.seconds:8.2f} {n / t.seconds:10,.0f}   {spent} ({busy:.0%} busy)")
        if isinstance(t, EndToEnd):
            print(f"  {'    all requests answered 200':40s} {t.acked:8.2f} {n / t.acked:10,.0f}")
        if t.foreign > 0.1 * t.seconds * cores:
            noisy.append(f"{label[:3]}: other processes used {t.foreign:.1f} CPU-s")
    print()
    rate = {label[:3]: n / t.seconds for label, (n, t) in results.items()}
    print(f"  (l)/(b) = {rate['(l)'] / rate['(b)']:5.2f}x   logs protobuf vs raw COPY")
    print(f"  (j)/(b) = {rate['(j)'] / rate['(b)']:5.2f}x   logs JSON vs raw COPY")
    spans = rate["(s)"]
    verdict = "met" if spans >= TARGET_SPANS else "MISSED"
    print(f"  spans/s = {spans:,.0f}   target >= {TARGET_SPANS:,}   {verdict}")
    if noisy:
        print()
        print("  WARNING: the machine was not quiet; these figures are not comparable:")
        for line in noisy:
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=int, default=100_000, help="log records per phase")
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=512, help="items per request")
    parser.add_argument("--threads", type=int, default=4, help="HTTP client threads")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--keep-db", action="store_true", help=f"keep {BENCH_DB} afterwards")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"preparing {BENCH_DB}, {args.logs:,} log records and {args.spans:,} spans …")
    with django_on(BENCH_DB, keep=args.keep_db) as bench_url:
        from runs.models import Project

        logs = make_logs(args.logs, args.batch)
        spans = make_spans(args.spans, args.batch)
        assert sum(map(count_items, logs)) == args.logs
        assert sum(map(count_items, spans)) == args.spans
        pb_logs = [r.SerializeToString() for r in logs]
        json_logs = [json_body(r) for r in logs]
        pb_spans = [r.SerializeToString() for r in spans]
        sizes = {
            "pb_log": sum(map(len, pb_logs)) / args.logs,
            "json_log": sum(map(len, json_logs)) / args.logs,
            "pb_span": sum(map(len, pb_spans)) / args.spans,
        }
        results: dict[str, tuple[int, Timing]] = {}
        with psycopg.connect(bench_url, autocommit=True) as conn:
            server = server_settings(conn)
            postmaster = postmaster_pid(conn)
            project = Project.objects.create(name="Bench", slug="bench")

            reset(conn)
            rows = stored_rows(logs, project)
            print("(b) raw COPY of the log rows …", flush=True)
            results["(b) raw COPY of the event rows"] = (
                args.logs,
                phase_copy(bench_url, rows, postmaster),
            )

            reset(conn)
            token = project.create_token("bench")
            args.broker_name = "redis" if redis_reachable() else "filesystem"
            broker = REDIS_URL if args.broker_name == "redis" else "filesystem://"
            with running_portal(
                url=bench_url,
                broker=broker,
                web_workers=args.web_workers,
                web_threads=args.web_threads,
                concurrency=args.concurrency,
            ) as portal:
                warm_up(portal, conn, token, logs, spans)
                phases = (
                    (
                        "(l) OTLP logs, protobuf -> events",
                        "/v1/logs",
                        pb_logs,
                        False,
                        "runs_event",
                        args.logs,
                    ),
                    (
                        "(j) OTLP logs, JSON -> events",
                        "/v1/logs",
                        json_logs,
                        True,
                        "runs_event",
                        args.logs,
                    ),
                    (
                        "(s) OTLP spans, protobuf -> spans",
                        "/v1/traces",
                        pb_spans,
                        False,
                        "telemetry_span",
                        args.spans,
                    ),
                )
                for label, path, bodies, json, table, total in phases:
                    print(f"{label} …", flush=True)
                    results[label] = (
                        total,
                        phase_http(
                            portal,
                            conn,
                            postmaster,
                            token,
                            path,
                            bodies,
                            json,
                            table,
                            total,
                            args.threads,
                        ),
                    )
                    reset(conn)
        report(args, results, server, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
