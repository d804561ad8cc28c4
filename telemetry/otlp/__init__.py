"""OTLP/HTTP logs, metrics and traces, in the order a request travels.

1. **Decode** (`codec.decode`): the body, protobuf (`protobuf.py`) or OTLP/JSON
   (`otlp_json.py`), becomes one internal shape (`items.py`: `LogIn`, `SpanIn`,
   `PointIn`, each pointing at its `Scope`), so both encodings store identical rows.
2. **Judge** (`items.py`): each item is accepted or refused with a reason, by the
   same rules for both encodings; the request answers `partial_success` with what
   was refused (`codec.response_body`) and spools the raw body.
3. **Map** (`mapping.py`): the worker decodes the body again with the same code and
   turns each accepted item into the values of our rows: log records into run event
   Records, spans into their attributes and events, data points into metric labels,
   each item into the run it belongs to.
4. **Store** (`store.py`): `store_logs_batch`, `store_traces_batch`,
   `store_metrics_batch` (called by the receivers in telemetry/receivers/otlp.py)
   write the rows, and the runs they open or touch.

The endpoints are in telemetry/otlp_views.py; docs/otlp.md has the mapping tables
and the decisions behind them. Nothing is re-exported: import from the module.
"""
