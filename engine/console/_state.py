"""What every handler of the console shares: settings, client, sessions, templates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from engine.client import SagaClient
from engine.clock import utc_now
from engine.console import _format
from engine.console._auth import Identity, Sessions
from engine.console._settings import ConsoleSettings
from engine.definition import is_pivot
from engine.errors import UnknownSagaError

HERE = Path(__file__).parent


def templates() -> jinja2.Environment:
    """The pages' templates: autoescaped, every value through :func:`_format.shown`."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        finalize=_format.shown,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        utc=_format.utc,
        iso=_format.iso,
        duration=_format.duration,
        ago=_format.ago,
        json_lines=_format.json_lines,
        text_lines=_format.text_lines,
    )
    return env


class Console:
    """The console's state, one per app (``app.state.console``)."""

    def __init__(
        self,
        settings: ConsoleSettings,
        client: SagaClient | None,
        *,
        clock: Callable[[], datetime] = utc_now,
        live_interval: float = 0.5,
        live_timeout: float = 300.0,
    ) -> None:
        self.settings = settings
        self._client = client
        self.clock = clock
        self.sessions = Sessions()
        self.env = templates()
        #: How often a live page's saga is read, and how long one stream lasts (the
        #: browser's EventSource then reconnects).
        self.live_interval = live_interval
        self.live_timeout = live_timeout

    @property
    def client(self) -> SagaClient:
        """The client pages read through (connected by the app's lifespan if the
        factory was not given one)."""
        if self._client is None:
            raise RuntimeError("the console's client is not connected (the app is not started)")
        return self._client

    @client.setter
    def client(self, client: SagaClient | None) -> None:
        self._client = client

    def can_act(self, identity: Identity | None) -> bool:
        """Actions are offered only when enabled and to an authenticated user."""
        return self.settings.console_actions and identity is not None

    def pivot(self, name: str, version: int) -> str | None:
        """The pivot step of a definition this process loads (None: none, or not
        loaded here)."""
        try:
            definition = self.client.registry.get(name, version)
        except UnknownSagaError:
            return None
        return next((n.name for n in definition.nodes if is_pivot(n)), None)

    def trace_url(self, trace_id: str | None) -> str | None:
        """The trace viewer's page of a trace, if a viewer is configured."""
        template = self.settings.console_trace_url
        if template is None or not trace_id:
            return None
        return template.replace("{trace_id}", quote(trace_id, safe=""))

    def fragment(self, name: str, context: Mapping[str, Any]) -> str:
        """A template rendered alone (a live update's piece of a page)."""
        return self.env.get_template(name).render(context)

    def page(
        self, request: Request, name: str, context: Mapping[str, Any], status: int = 200
    ) -> HTMLResponse:
        """A whole page, with what the layout needs: who is logged in, whether they
        may act, their CSRF token."""
        identity: Identity | None = getattr(request.state, "identity", None)
        full = {
            "request": request,
            "identity": identity,
            "can_act": self.can_act(identity),
            "csrf": identity.csrf if identity is not None else None,
            "has_credentials": self.settings.has_credentials,
            "actions_enabled": self.settings.console_actions,
            "now": self.clock(),
            **context,
        }
        return HTMLResponse(self.env.get_template(name).render(full), status_code=status)
