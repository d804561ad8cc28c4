"""Operator pages for runs: the list, one run with its live timeline, artifacts, compare.

One template per page; an htmx request gets a named partial of the same template,
chosen by the element it targets (`HX-Target`, portal/pages.py), so page and
fragment never drift. The run page's errors and spans sections are telemetry's
(`telemetry_panels` template tags): this module never imports telemetry.
Everything shown comes from agents and is untrusted: templates only ever escape it,
and nothing agent-made goes into an `hx-*` attribute (links carry it in `href`,
inside `hx-boost` containers; pollers take filters from hidden form fields).
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib.auth.decorators import login_required
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers
from django.utils.http import content_disposition_header
from django.utils.text import slugify

from portal.http import allow_methods
from portal.pages import page
from runs import charts, insights, search, work_context
from runs.diffs import diff_texts
from runs.models import LEVELS, Artifact, Event, Project, Run

RUNS_PAGE = 50
TIMELINE_PAGE = 500
BANNER_MAX = 20
SLUG_SUGGESTIONS_FROM = 1000  # newest runs whose slugs the filter suggests
INLINE_MAX_BYTES = 2 * 1024 * 1024  # larger text artifacts are offered as a download
COMPARE_MAX_BYTES = 512 * 1024  # per side, for the diff of two same-named artifacts
# Types a browser might run or render from our origin: always downloaded as opaque bytes.
ACTIVE_TYPES = ("html", "xml", "svg", "javascript", "ecmascript", "pdf")


def as_id(value: str) -> int | None:
    """A non-negative 64-bit integer from a query parameter, else None (never a 500)."""
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


def int_param(request: HttpRequest, name: str) -> int | None:
    return as_id(request.GET.get(name, ""))


# --- Runs list ------------------------------------------------------------------


class RunFilterForm(forms.Form):
    project = forms.ChoiceField(required=False)
    slug = forms.CharField(required=False, max_length=200)
    status = forms.ChoiceField(required=False, choices=[("", "any status"), *Run.Status.choices])
    phase = forms.CharField(required=False, max_length=64)
    since = forms.DateTimeField(required=False, label="Started after (UTC)")
    until = forms.DateTimeField(required=False, label="Started before (UTC)")
    q = forms.CharField(required=False, max_length=200, label="Search")
    # Work context (runs/work_context.py): exact values of Run.attributes keys.
    rig = forms.CharField(required=False, max_length=200, help_text="work_rig")
    bead = forms.CharField(required=False, max_length=200, help_text="work_bead")
    mol = forms.CharField(required=False, max_length=200, label="Molecule", help_text="work_mol")
    role = forms.CharField(required=False, max_length=200, help_text="gt.role")
    agent = forms.CharField(required=False, max_length=200, help_text="gt.agent")

    def __init__(self, data, projects: list[tuple[str, str]]):
        super().__init__(data)
        self.fields["project"].choices = [("", "all projects"), *projects]
        for name in ("since", "until"):
            self.fields[name].widget = forms.DateTimeInput(attrs={"type": "datetime-local"})
        self.fields["q"].widget.attrs.update(type="search", placeholder="run id, slug, host…")
        self.fields["slug"].widget.attrs.update(list="slug-suggestions", autocomplete="off")
        self.is_valid()  # a bad field is reported and ignored; the good ones still apply

    @property
    def active(self) -> bool:
        return any(self.cleaned_data.get(name) for name in self.fields)

    def apply(self, runs):
        data = self.cleaned_data
        lookups = {
            "project": "project__slug",
            "slug": "slug",
            "status": "status",
            "phase": "phase",
            "since": "started_at__gte",
            "until": "started_at__lt",
        }
        runs = runs.filter(**{lookup: data[f] for f, lookup in lookups.items() if data.get(f)})
        if q := data.get("q"):
            runs = runs.filter(
                Q(run_id__icontains=q)
                | Q(slug__icontains=q)
                | Q(kind__icontains=q)
                | Q(host__icontains=q)
            )
        return work_context.filter_by(runs, "attributes", work_context.wanted(data))


def slug_suggestions() -> list[str]:
    """Slugs of the newest runs: a bounded query however many runs there are."""
    newest = Run.objects.order_by("-id").values("pk")[:SLUG_SUGGESTIONS_FROM]
    slugs = Run.objects.filter(pk__in=newest).exclude(slug="").values_list("slug", flat=True)
    return list(slugs.distinct().order_by("slug")[:200])


@allow_methods("GET")
@login_required
def run_list(request: HttpRequest) -> HttpResponse:
    projects = list(Project.objects.order_by("name").values_list("slug", "name"))
    form = RunFilterForm(request.GET, projects)
    runs = form.apply(Run.objects.select_related("project"))
    cursor, before = int_param(request, "cursor"), int_param(request, "before")
    if before is not None:  # newer page: walk up from `before`, show newest first
        rows = list(runs.filter(id__gt=before).order_by("id")[: RUNS_PAGE + 1])
        newer, rows = len(rows) > RUNS_PAGE, rows[:RUNS_PAGE][::-1]
        older = bool(rows)
    else:
        if cursor is not None:
            runs = runs.filter(id__lt=cursor)
        rows = list(runs.order_by("-id")[: RUNS_PAGE + 1])
        older, rows = len(rows) > RUNS_PAGE, rows[:RUNS_PAGE]
        newer = cursor is not None
    orphans = list(
        Run.objects.orphans().select_related("project").order_by("-id")[: BANNER_MAX + 1]
    )
    context = {
        "form": form,
        "runs": rows,
        "older_cursor": rows[-1].pk if older and rows else None,
        "newer_cursor": rows[0].pk if newer and rows else None,
        "page_param": f"cursor={cursor}" if cursor else (f"before={before}" if before else ""),
        "orphans": orphans[:BANNER_MAX],
        "more_orphans": len(orphans) > BANNER_MAX,
        # Only an empty page asks whether there is anything at all (the newcomer's view).
        "no_runs_yet": not rows and not Run.objects.exists(),
        "ingest_url": request.build_absolute_uri("/api/ingest/events"),
    }
    if not (request.htmx and request.htmx.target == "runs"):
        context["slugs"] = slug_suggestions()
    return page(request, "runs/list.html", context, {"runs": "runs"})


# --- One run --------------------------------------------------------------------


def run_for(request: HttpRequest, run_id: str) -> tuple[Run, list[Run]]:
    """The run a URL names, and its namesakes in other projects (run ids are per project).

    Every operator sees every project. Without `?project=` the newest run of that
    id wins; the page links the others.
    """
    found = list(
        Run.objects.filter(run_id=run_id).select_related("project", "parent").order_by("-id")[:10]
    )
    wanted = request.GET.get("project", "")
    run = next((r for r in found if r.project.slug == wanted), None) if wanted else None
    run = run or (found[0] if found else None)
    if run is None:
        raise Http404("No such run.")
    return run, [r for r in found if r.pk != run.pk]


def timeline_filters(request: HttpRequest) -> tuple[str, str, dict[str, str]]:
    """Name prefix, minimum level and work context (`?role=…`, key -> value) of a view."""
    prefix = request.GET.get("filter", "")[:200]
    level = request.GET.get("level", "")
    context = work_context.wanted(request.GET)
    return prefix, level if level in LEVELS[1:] else "", context


def context_choices(request: HttpRequest, run: Run, context: dict[str, str]) -> list[dict]:
    """The timeline's work-context chips: values seen in the run's newest events (and the
    active ones), each with the page URL selecting it (other filters kept, `after` dropped).
    """
    choices = work_context.timeline_values(run.pk)
    seen = {(c["param"], c["value"]) for c in choices}
    for param, key in work_context.PARAMS.items():
        if key in context and (param, context[key]) not in seen:
            choices.append({"param": param, "key": key, "value": context[key], "count": None})
    for choice in choices:
        query = request.GET.copy()
        query.pop("after", None)
        active = context.get(choice["key"]) == choice["value"]
        if active:
            query.pop(choice["param"], None)  # a second click on the chip lifts it
        else:
            query[choice["param"]] = choice["value"]
        choice["active"] = active
        choice["url"] = "?" + query.urlencode() if query else "?"
    return choices


@allow_methods("GET")
@login_required
def run_detail(request: HttpRequest, run_id: str) -> HttpResponse:
    run, namesakes = run_for(request, run_id)
    prefix, level, context_filter = timeline_filters(request)
    events = work_context.filter_by(
        Event.objects.timeline(run, prefix, level), "data", context_filter
    )
    after = int_param(request, "after")
    earlier = False
    if after is None:
        after = 0
        if run.is_active:
            # Following a live run starts at its tail; the start is one link away.
            newest = events.order_by("-seq").values_list("seq", flat=True)
            if tail := list(newest[TIMELINE_PAGE : TIMELINE_PAGE + 1]):
                after, earlier = tail[0], True
    rows = list(events.filter(seq__gt=after)[: TIMELINE_PAGE + 1])
    more, rows = len(rows) > TIMELINE_PAGE, rows[:TIMELINE_PAGE]
    context = {
        "run": run,
        "events": rows,
        "more": more,
        "after": after,
        "cursor": rows[-1].seq if rows else after,
        "earlier": earlier,
        "filter": prefix,
        "level": level,
        "levels": LEVELS[1:],
        "context_filter": context_filter,
        "context_params": [
            (param, context_filter.get(key, "")) for param, key in work_context.PARAMS.items()
        ],
        "follow": run.is_active and not more,
    }
    target = request.htmx.target if request.htmx else ""
    if target == "timeline-next":
        # New rows only, for the live poller (and "show more"). The poller also gets the
        # summary (out of band) and, once the run has ended, 286: htmx stops polling.
        polled = request.htmx.trigger == "timeline-next"
        context["polled"] = polled
        status = 286 if polled and not run.is_active else 200
        return page(request, "runs/detail.html", context, {"timeline-next": "rows"}, status)
    context["namespaces"] = Event.objects.namespaces(run)
    # Only runs with a work context (on the run: OTLP, `run.begin`) pay for the sample query.
    if context_filter or work_context.chips(run.attributes):
        context["context_choices"] = context_choices(request, run, context_filter)
    if target != "timeline":
        context["metrics"] = metrics_panel(run)
        first_error = None
        if run.errors_count:
            errors = Event.objects.filter(run_id=run.pk, level="error").order_by("seq")
            first_error = errors.values_list("seq", flat=True).first()
        unfiltered = not prefix and not level and not context_filter
        context.update(
            namesakes=namesakes,
            first_error=first_error,
            # On this page already: a plain anchor; else a link to a page starting there.
            first_error_here=bool(
                first_error and unfiltered and rows and rows[0].seq <= first_error <= rows[-1].seq
            ),
            artifacts=list(run.artifacts.listing()),
            forks=list(run.forks.order_by("id")[:50]),
            siblings=list(
                Run.objects.filter(project_id=run.project_id, slug=run.slug)
                .exclude(pk=run.pk)
                .order_by("-id")[:20]
            ),
            ingest_url=request.build_absolute_uri("/api/ingest/events"),
            api_url=request.build_absolute_uri("/api/runs/"),
        )
        # The "Errors" and "Spans" sections come from telemetry's template tags
        # (`{% run_errors run %}`, `{% run_spans run %}`): runs never imports telemetry.
    return page(request, "runs/detail.html", context, {"timeline": "timeline"})


@allow_methods("GET")
@login_required
def run_events_jsonl(request: HttpRequest, run_id: str) -> StreamingHttpResponse:
    """The timeline as Gitoma JSONL, with the page's filters: the API's generator.

    Also for run ids with a slash (the shipper's `<slug>/<file stem>`), which the
    API's `{run_id}` path segment cannot address.
    """
    # Imported here: runs.api imports portal.api, which imports runs.api (a cycle).
    from runs.api import EventFilters, event_lines

    run, _ = run_for(request, run_id)
    prefix, level, _context = timeline_filters(request)
    params = {p: request.GET.get(p, "")[: work_context.MAX_VALUE] for p in work_context.PARAMS}
    filters = EventFilters(filter=prefix, level=level, format="jsonl", **params)
    lines = event_lines(run, filters)
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
    # The slug is agent text: slugified, it cannot break the header.
    name = f"{slugify(run.slug)[:80] or 'run'}-{run.pk}.jsonl"
    response["Content-Disposition"] = content_disposition_header(True, name)
    return response


# --- Artifacts ------------------------------------------------------------------


def artifact_for(request: HttpRequest, pk: int, with_content: bool = True) -> Artifact:
    artifacts = Artifact.objects.select_related("run", "run__project")
    if not with_content:
        artifacts = artifacts.defer("content")
    artifact = artifacts.filter(pk=pk).first()
    if artifact is None:
        raise Http404("No such artifact.")
    return artifact


@allow_methods("GET")
@login_required
def artifact_detail(request: HttpRequest, pk: int) -> HttpResponse:
    artifact = artifact_for(request, pk, with_content=False)
    too_large = artifact.size > INLINE_MAX_BYTES
    context: dict = {"artifact": artifact, "run": artifact.run, "too_large": too_large}
    context.update(text=None, diff=None)
    if artifact.is_text and not too_large:
        artifact = artifact_for(request, pk)
        text = artifact.text()
        if text is not None and artifact.is_diff:
            diff = artifact.diff()
            context["diff"] = diff if diff.files else None
        context["text"] = text
    return render(request, "runs/artifact.html", context)


@allow_methods("GET")
@login_required
def artifact_download(request: HttpRequest, pk: int) -> HttpResponse:
    artifact = artifact_for(request, pk)
    ctype = artifact.content_type
    if any(word in ctype for word in ACTIVE_TYPES):
        ctype = "application/octet-stream"
    response = HttpResponse(bytes(artifact.content), content_type=ctype)
    response["Content-Disposition"] = content_disposition_header(True, artifact.name)
    # Belt and braces: even if a browser rendered it, it could run nothing.
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


# --- Compare --------------------------------------------------------------------


def phase_rows(a: Run, b: Run) -> list[dict]:
    """Phases of both runs aligned by name, in order of first appearance.

    A phase entered several times (a retry loop) shows its total time and count.
    """
    rows: dict[str, dict] = {}
    for side, run in (("a", a), ("b", b)):
        for span in run.phases():
            row = rows.setdefault(span.name, {"name": span.name, "a": None, "b": None})
            total = row[side] or {"ms": None, "count": 0}
            if span.duration_ms is not None:
                total["ms"] = (total["ms"] or 0) + span.duration_ms
            total["count"] += 1
            row[side] = total
    return list(rows.values())


def artifact_rows(a: Run, b: Run) -> list[dict]:
    """Artifacts of both runs by name; same-named text files get a diff."""
    by_name: dict[str, dict] = {}
    for artifact in Artifact.objects.filter(run__in=(a, b)).listing():
        by_name.setdefault(artifact.name, {})["a" if artifact.run_id == a.pk else "b"] = artifact
    to_diff = [
        pair
        for pair in by_name.values()
        if len(pair) == 2
        and pair["a"].sha256 != pair["b"].sha256
        and pair["a"].is_text
        and pair["b"].is_text
        and max(pair["a"].size, pair["b"].size) <= COMPARE_MAX_BYTES
    ]
    wanted = [art.pk for pair in to_diff for art in pair.values()]
    contents = dict(Artifact.objects.filter(pk__in=wanted).values_list("pk", "content"))
    rows = []
    for i, (name, pair) in enumerate(sorted(by_name.items())):
        row = {"name": name, "a": pair.get("a"), "b": pair.get("b"), "diff": None}
        row["anchor"] = f"cmp{i}"  # ids of the diff's file sections, unique on the page
        if pair in to_diff:
            old = bytes(contents[pair["a"].pk]).decode("utf-8", "replace")
            new = bytes(contents[pair["b"].pk]).decode("utf-8", "replace")
            row["diff"] = diff_texts(old, new, f"{a.run_id}/{name}", f"{b.run_id}/{name}")
        rows.append(row)
    return rows


@allow_methods("GET")
@login_required
def compare(request: HttpRequest) -> HttpResponse:
    ids = [pk for pk in map(as_id, request.GET.getlist("run")) if pk is not None][:2]
    context: dict = {"a": None, "b": None}
    if len(ids) == 2:
        found = {r.pk: r for r in Run.objects.filter(pk__in=ids).select_related("project")}
        if len(found) < len(set(ids)):
            raise Http404("No such run.")
        a, b = found[ids[0]], found[ids[1]]
        context.update(a=a, b=b, phases=phase_rows(a, b), artifacts=artifact_rows(a, b))
    return render(request, "runs/compare.html", context)


# --- Metrics: the dashboard and a run's metrics panel ---------------------------------

COST_MIN_DAYS = 7  # the cost chart shows at least a week, whatever the window


@allow_methods("GET")
@login_required
def metrics_dashboard(request: HttpRequest) -> HttpResponse:
    """Charts of run metrics, cost per slug and day, tool reliability, provider latency.

    Every figure is aggregated in PostgreSQL over the chosen window (runs/insights.py);
    the charts are SVG drawn by the template from runs/charts.py's geometry.
    """
    window, since, until = insights.window(request.GET.get("window", ""))
    names = insights.metric_names(since, until)
    metric = request.GET.get("metric", "")
    if metric not in names:
        metric = names[0] if names else ""
    by = request.GET.get("by", "slug")
    by = by if by in insights.SERIES_KEYS else "slug"
    chart = hidden = None
    if metric:
        series, unit, hidden = insights.metric_series(
            metric, since, until, insights.STEPS[window], by
        )
        chart = charts.line_chart(series, since, until, unit)
    cost_since = min(since, until - timedelta(days=COST_MIN_DAYS))
    days, costs = insights.cost_per_slug_day(cost_since, until)
    context = {
        "window": window,
        "windows": list(insights.WINDOWS),
        "since": since,
        "until": until,
        "names": names,
        "metric": metric,
        "by": by,
        "chart": chart,
        "hidden_series": hidden,
        "cost_chart": charts.stacked_bars(days, costs),
        "cost_days": len(days),
        "tools": insights.tool_stats(since, until),
        "providers": insights.provider_stats(since, until),
    }
    return render(request, "runs/metrics.html", context)


def metrics_panel(run: Run) -> list[dict]:
    """The run page's metrics: one row per name, a sparkline when the name repeats."""
    rows = insights.run_metric_panel(run.pk)
    for row in rows:
        row["spark"] = charts.sparkline([value for _, value in row["values"]])
    return rows


@allow_methods("GET")
@login_required
def run_metrics(request: HttpRequest, pk: int) -> HttpResponse:
    """The metrics panel alone (by the run's own key: no agent text in the poller's URL).

    While the run is active the panel polls this; once it has ended, 286 stops the poll.
    """
    run = Run.objects.select_related("project").filter(pk=pk).first()
    if run is None:
        raise Http404("No such run.")
    context = {"run": run, "metrics": metrics_panel(run)}
    polled = bool(request.htmx and request.htmx.trigger == "run-metrics")
    status = 286 if polled and not run.is_active else 200
    response = render(request, "runs/detail.html#metrics-panel", context, status=status)
    patch_vary_headers(response, ("HX-Request",))
    return response


# --- Search across runs --------------------------------------------------------------


class SearchForm(forms.Form):
    q = forms.CharField(required=False, max_length=search.MAX_QUERY, label="Find")
    project = forms.ChoiceField(required=False)
    slug = forms.CharField(required=False, max_length=100)
    level = forms.ChoiceField(
        required=False,
        choices=[("", "any level"), *((lv, f"{lv} and above") for lv in LEVELS[1:])],
        label="Level",
    )
    event = forms.CharField(required=False, max_length=200, label="Event prefix")
    since = forms.DateTimeField(required=False, label="From (UTC)")
    until = forms.DateTimeField(required=False, label="To (UTC)")

    def __init__(self, data, projects: list[tuple[str, str]]):
        super().__init__(data)
        self.fields["project"].choices = [("", "all projects"), *projects]
        for name in ("since", "until"):
            self.fields[name].widget = forms.DateTimeInput(attrs={"type": "datetime-local"})
        self.fields["q"].widget.attrs.update({"autofocus": True, "type": "search"})
        self.fields["event"].widget.attrs["placeholder"] = "llm."


@login_required
def search_events(request: HttpRequest) -> HttpResponse:
    projects = list(Project.objects.order_by("name").values_list("slug", "name"))
    form = SearchForm(request.GET, projects)
    context: dict = {"form": form, "searched": False, "hits": [], "next_cursor": None}
    if form.is_valid() and form.cleaned_data["q"].strip():
        data = form.cleaned_data
        project = Project.objects.filter(slug=data["project"]).first() if data["project"] else None
        wanted = search.Search(
            q=data["q"],
            project_ids=[project.pk] if project else None,
            slug=data["slug"],
            level=data["level"],
            event=data["event"],
            since=data["since"],
            until=data["until"],
            cursor=request.GET.get("cursor", "")[:64],
        )
        try:
            context["hits"], context["next_cursor"] = search.search(wanted)
            context["searched"] = True
            context["window"] = wanted.window()
        except search.SearchError as exc:
            context["problem"] = str(exc)
    return page(request, "runs/search.html", context, {"results": "results"})
