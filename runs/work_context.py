"""Work context (Gas Town): which rig, bead and molecule a run works on, and who runs it.

Gitoma events keep `work_rig`, `work_bead`, `work_mol` of `run.begin` (and
`data.attributes`) on `Run.attributes`; OTLP keeps them in each event's `data` and
the newest on the run, with `gt.role` and `gt.agent` (telemetry/otlp/mapping.py). Operators
filter by short names (`?rig=gastown&role=polecat`), one parameter per key, the
same on the runs list, `GET /api/runs`, the run page's timeline and the events API.

Runs are matched with `attributes @> {"work_rig": "gastown"}`, which the GIN index
`run_attributes_gin` (jsonb_path_ops) answers on a table of any size. Events are
matched the same way on `data`, within one run: the (run, seq) index bounds the scan.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.db.models import Q

from portal.db import read_connection

# Query parameter -> attribute key, in the order chips are shown.
PARAMS = {
    "rig": "work_rig",
    "bead": "work_bead",
    "mol": "work_mol",
    "role": "gt.role",
    "agent": "gt.agent",
}
MAX_VALUE = 200  # as telemetry/otlp/mapping.py bounds the values it puts on a run


def wanted(params) -> dict[str, str]:
    """The work-context filters of a request's GET (or a form's cleaned data): key -> value."""
    out = {}
    for param, key in PARAMS.items():
        value = params.get(param) or ""
        if isinstance(value, str) and value.strip():
            out[key] = value.strip()[:MAX_VALUE]
    return out


def _contains(field: str, key: str, value: str) -> Q:
    """`field @> {key: value}`; an integer-looking value also matches the JSON number
    (a Gitoma `run.begin` may send `"work_bead": 42`; chips show it as `42`)."""
    match = Q(**{f"{field}__contains": {key: value}})
    if value.lstrip("-").isdigit() and len(value) < 19:
        match |= Q(**{f"{field}__contains": {key: int(value)}})
    return match


def filter_by(queryset, field: str, context: dict[str, str]):
    """Narrow runs (`attributes`) or events (`data`) to those carrying every pair."""
    for key, value in context.items():
        queryset = queryset.filter(_contains(field, key, value))
    return queryset


def chips(attributes: dict | None) -> list[dict]:
    """The run's work context as chips: label, value and the runs list URL filtering by it.

    Values are agent text: returned as plain strings, escaped by the template; the
    URL is percent-encoded here (`&`, quotes and `<` cannot leave the query value).
    """
    if not isinstance(attributes, dict):
        return []
    out = []
    for param, key in PARAMS.items():
        value = attributes.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            continue
        value = str(value).strip()[:MAX_VALUE]
        if value:
            out.append(
                {"param": param, "key": key, "value": value, "query": urlencode({param: value})}
            )
    return out


SAMPLE = 5000  # newest events of a run whose context values the timeline offers


def timeline_values(run_pk: int, limit: int = 40) -> list[dict]:
    """Work-context values in the run's newest SAMPLE events, most frequent first.

    A day run of a service (`gastown@2026-12-01`) carries many beads and agents; a
    bounded sample keeps the cost independent of the run's size (one index range on
    (run, seq), newest first), where a full GROUP BY would read every row's `data`.
    """
    pairs = ", ".join("(%s, %s)" for _ in PARAMS)
    sql = f"""
        SELECT c.param, c.value, count(*) AS n
        FROM (SELECT data FROM runs_event WHERE run_id = %s ORDER BY seq DESC LIMIT %s) AS e,
             LATERAL (SELECT k.param, e.data ->> k.key AS value, jsonb_typeof(e.data -> k.key) AS t
                      FROM (VALUES {pairs}) AS k(param, key)) AS c
        WHERE jsonb_typeof(e.data) = 'object' AND c.t IN ('string', 'number') AND c.value <> ''
        GROUP BY c.param, c.value
        ORDER BY n DESC, c.param, c.value
        LIMIT %s"""
    params: list = [run_pk, SAMPLE]
    for param, key in PARAMS.items():
        params += [param, key]
    params.append(limit)
    with read_connection().cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    order = list(PARAMS)
    found = [{"param": p, "key": PARAMS[p], "value": v[:MAX_VALUE], "count": n} for p, v, n in rows]
    return sorted(found, key=lambda c: (order.index(c["param"]), -c["count"], c["value"]))
