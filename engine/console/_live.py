"""Live updates of a saga page: server-sent events at ``/sagas/{id}/events``.

The page's script (static/console.js) opens an ``EventSource`` while the saga is
unfinished and puts each ``update`` event's pieces in place: the status word, the
timeline, the steps and the history, rendered here by the page's own templates (so
escaped like the page). The stream reads the saga every ``live_interval`` seconds,
sends an update when it changed (and every few seconds anyway, so the bar in flight
grows), and ends when the saga finished or after ``live_timeout`` (the browser then
reconnects by itself).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from engine.console._pages import console_of, saga_context
from engine.console._state import Console
from engine.errors import LimitError, SagaNotFoundError
from engine.views import SagaDetail

#: An update goes out at least this often while the saga runs (seconds).
REFRESH = 2.0
#: How long the browser waits before reconnecting a stream that ended (ms).
RECONNECT_MS = 2000


def update(console: Console, detail: SagaDetail) -> dict[str, Any]:
    """One ``update`` event's data: the status and the page's live pieces as HTML."""
    context = saga_context(console, detail)
    return {
        "status": detail.status.value,
        "finished": context["finished"],
        "timeline": console.fragment("_timeline.html", context),
        "steps": console.fragment("_steps.html", context),
        "history": console.fragment("_history.html", context),
    }


def event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event (its data is one line of JSON)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def saga_events(request: Request) -> Response:
    """``/sagas/{id}/events``: the saga's updates until it finished."""
    console = console_of(request)
    saga_id = request.path_params["saga_id"]
    try:
        first = await console.client.get(saga_id)
    except (SagaNotFoundError, LimitError) as exc:
        return Response(str(exc), status_code=404, media_type="text/plain")
    return StreamingResponse(
        _stream(console, saga_id, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(console: Console, saga_id: str, detail: SagaDetail) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + console.live_timeout
    yield f"retry: {RECONNECT_MS}\n\n"
    last: tuple[Any, ...] | None = None
    sent_at = 0.0
    while True:
        marker = (detail.status, detail.updated_at, len(detail.history))
        if marker != last or loop.time() - sent_at >= REFRESH:
            yield event("update", update(console, detail))
            last, sent_at = marker, loop.time()
        if detail.status.is_terminal or loop.time() >= deadline:
            return
        await asyncio.sleep(console.live_interval)
        try:
            detail = await console.client.get(saga_id)
        except SagaNotFoundError:  # pruned meanwhile
            yield event("gone", {"saga_id": saga_id})
            return
