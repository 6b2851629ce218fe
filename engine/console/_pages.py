"""The console's pages (GET): sagas, one saga, dead letters, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from engine.console._state import Console
from engine.console._timeline import timeline
from engine.errors import DeadLetterNotFoundError, LimitError, SagaNotFoundError
from engine.states import SagaStatus
from engine.timefmt import parse_instant
from engine.views import SagaDetail, SagaPage, TimeRange

#: Sagas on a page unless ``limit`` says otherwise, and the most it may say.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: Dead letters listed.
DEAD_LETTERS_SHOWN = 100


def console_of(request: Request) -> Console:
    """The app's :class:`Console`."""
    console: Console = request.app.state.console
    return console


async def home(request: Request) -> Response:
    """``/``: the saga list."""
    return RedirectResponse("/sagas", status_code=307)


@dataclass
class ListQuery:
    """The saga list's filters, read from the query string."""

    status: SagaStatus | None = None
    name: str | None = None
    version: int | None = None
    keys: dict[str, str] = field(default_factory=dict)
    id_prefix: str | None = None
    created: TimeRange | None = None
    updated: TimeRange | None = None
    after: str | None = None
    limit: int = PAGE_SIZE
    #: What the form shows back, as given.
    form: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


FORM_FIELDS = (
    "q",
    "status",
    "saga",
    "version",
    "created_from",
    "created_to",
    "updated_from",
    "updated_to",
    "limit",
)


def read_list_query(request: Request, now: datetime) -> ListQuery:
    """The filters of ``/sagas``; what cannot be read is an error shown on the page."""
    params = request.query_params
    query = ListQuery(form={name: params.get(name, "").strip() for name in FORM_FIELDS})
    form = query.form
    if form["status"]:
        try:
            query.status = SagaStatus(form["status"])
        except ValueError:
            query.errors.append(f"unknown status {form['status']!r}")
    query.name = form["saga"] or None
    if form["version"]:
        if form["version"].isdigit() and int(form["version"]) >= 1:
            query.version = int(form["version"])
        else:
            query.errors.append("the version must be a number from 1")
    if form["limit"]:
        if form["limit"].isdigit() and 1 <= int(form["limit"]) <= MAX_PAGE_SIZE:
            query.limit = int(form["limit"])
        else:
            query.errors.append(f"the page size must be from 1 to {MAX_PAGE_SIZE}")
    given_keys = [k for k in params.getlist("key") if k.strip()]
    q = form["q"]
    if "=" in q:
        given_keys.append(q)
    elif q:
        query.id_prefix = q
    for pair in given_keys:
        name, _, value = pair.strip().partition("=")
        if not name.strip() or not value.strip():
            query.errors.append(f"{pair!r} is not a business key: write name=value")
            continue
        query.keys[name.strip()] = value.strip()
    form["keys"] = "\n".join(k for k in params.getlist("key") if k.strip())
    query.created = _range(form, "created", now, query.errors)
    query.updated = _range(form, "updated", now, query.errors)
    query.after = params.get("after") or None
    return query


def _range(form: dict[str, str], what: str, now: datetime, errors: list[str]) -> TimeRange | None:
    start = _instant(form[f"{what}_from"], now, f"{what} from", errors)
    end = _instant(form[f"{what}_to"], now, f"{what} to", errors)
    return TimeRange(start, end) if start is not None or end is not None else None


def _instant(text: str, now: datetime, what: str, errors: list[str]) -> datetime | None:
    """An age before now (``2h``) or an ISO time (UTC unless it says otherwise)."""
    if not text:
        return None
    try:
        return parse_instant(text, now)
    except ValueError as exc:
        errors.append(f"{what}: {exc}")
        return None


async def saga_list(request: Request) -> Response:
    """``/sagas``: filters, search, a page of sagas and the link to the next; a search
    for one saga's id goes to its page."""
    console = console_of(request)
    query = read_list_query(request, console.clock())
    one = await _one_saga(console, query)
    if one is not None:
        return RedirectResponse(f"/sagas/{quote(one, safe='')}", status_code=303)
    page = SagaPage(sagas=[])
    if not query.errors:
        try:
            page = await console.client.page(
                limit=query.limit,
                after=query.after,
                status=query.status,
                name=query.name,
                version=query.version,
                keys=query.keys or None,
                created=query.created,
                updated=query.updated,
                id_prefix=query.id_prefix,
            )
        except (ValueError, LimitError) as exc:
            query.errors.append(str(exc))
    context: dict[str, Any] = {
        "query": query,
        "page": page,
        "next_url": _next_url(request, page.next) if page.next else None,
        "first_url": _next_url(request, None),
        "statuses": list(SagaStatus),
        "saga_names": sorted({s.name for s in console.client.registry}),
    }
    return console.page(request, "sagas.html", context, 400 if query.errors else 200)


async def _one_saga(console: Console, query: ListQuery) -> str | None:
    """The saga a search stands for, when it wants one: the search alone is an id or
    the unambiguous start of one (:meth:`SagaClient.resolve
    <engine.client.SagaClient.resolve>`, as ``sagactl show`` takes ids). None: the
    list shows what begins with it (several sagas, or too short to be taken as one)."""
    others = {name: text for name, text in query.form.items() if name not in ("q", "keys")}
    if query.id_prefix is None or query.errors or query.keys or query.after or any(others.values()):
        return None
    try:
        return await console.client.resolve(query.id_prefix)
    except (SagaNotFoundError, LimitError):
        return None


def _next_url(request: Request, cursor: str | None) -> str:
    """The same list, after ``cursor`` (None: its first page)."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "after" and v]
    if cursor is not None:
        params.append(("after", cursor))
    return "/sagas" + (f"?{urlencode(params)}" if params else "")


def saga_context(console: Console, detail: SagaDetail) -> dict[str, Any]:
    """What the saga page and its live updates show of one saga."""
    now = console.clock()
    return {
        "saga": detail,
        "now": now,
        "timeline": timeline(detail, now, pivot=console.pivot(detail.name, detail.version)),
        "finished": detail.status.is_terminal,
        "children": children(detail),
    }


def children(detail: SagaDetail) -> dict[str, str]:
    """Step name -> the child saga it started last (its history says which)."""
    found: dict[str, str] = {}
    for entry in detail.history:
        if entry.event == "child_started" and entry.step and entry.detail:
            found[entry.step] = entry.detail.rsplit(" ", 1)[-1]
    return found


async def saga_page(request: Request) -> Response:
    """``/sagas/{id}``: status, timeline, input, replies, history, trace link."""
    console = console_of(request)
    saga_id = request.path_params["saga_id"]
    try:
        detail = await console.client.get(saga_id)
    except (SagaNotFoundError, LimitError) as exc:
        return console.page(request, "error.html", {"title": "No such saga", "error": exc}, 404)
    context = saga_context(console, detail)
    context["trace_url"] = console.trace_url(detail.trace_id)
    return console.page(request, "saga.html", context)


async def dead_letter_list(request: Request) -> Response:
    """``/dlq``: the archived dead letters, newest first."""
    console = console_of(request)
    pending = request.query_params.get("pending") == "1"
    letters = await console.client.dead_letters(limit=DEAD_LETTERS_SHOWN, pending_only=pending)
    return console.page(request, "dlq.html", {"letters": letters, "pending": pending})


async def dead_letter_page(request: Request) -> Response:
    """``/dlq/{id}``: one dead letter, its headers and its body as text."""
    console = console_of(request)
    try:
        letter = await console.client.dead_letter(request.path_params["letter"])
    except DeadLetterNotFoundError as exc:
        return console.page(
            request, "error.html", {"title": "No such dead letter", "error": exc}, 404
        )
    return console.page(request, "dead_letter.html", {"letter": letter})


async def stats_page(request: Request) -> Response:
    """``/stats``: how the sagas stand and what waits (``sagactl stats``)."""
    console = console_of(request)
    stats = await console.client.stats()
    return console.page(request, "stats.html", {"stats": stats, "statuses": list(SagaStatus)})
