"""The console's ASGI app: routes, the authentication gate, security headers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.client import SagaClient
from engine.console import _actions, _live, _pages
from engine.console._auth import Throttled, identify
from engine.console._settings import ConsoleSettings, load_console_settings
from engine.console._state import HERE, Console

#: Sent with every response: nothing runs but the console's own script, nothing is
#: framed, nothing leaks the page's address.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}

Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    settings: ConsoleSettings | None = None,
    *,
    client: SagaClient | None = None,
    live_interval: float = 0.5,
    live_timeout: float = 300.0,
) -> Starlette:
    """The web console as an ASGI app (serve it with uvicorn: ``sagactl console``).

    It reads through ``client`` when given (the caller closes it); otherwise its
    lifespan connects one with ``settings`` (by default the ``SAGA_*`` environment,
    ``SAGA_CONSOLE_*`` included) and closes it on shutdown. Read-only unless
    ``SAGA_CONSOLE_ACTIONS`` is on, and then only for authenticated users.
    """
    settings = settings if settings is not None else load_console_settings()
    console = Console(settings, client, live_interval=live_interval, live_timeout=live_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if client is not None:
            yield
            return
        console.client = await SagaClient.connect(settings=settings)
        try:
            yield
        finally:
            await console.client.close()
            console.client = None

    def gate(handler: Handler, *, page: bool = True) -> Handler:
        """Who the request is from; with credentials configured, nobody else passes."""

        async def guarded(request: Request) -> Response:
            try:
                identity = identify(request, settings, console.sessions)
            except Throttled:
                return _too_many()
            request.state.identity = identity
            if settings.has_credentials and identity is None:
                if page and request.method == "GET":
                    target = request.url.path + (
                        f"?{request.url.query}" if request.url.query else ""
                    )
                    login = "/login?" + urlencode({"next": target})
                    return RedirectResponse(login, status_code=303)
                response = Response("authentication required", status_code=401)
                if settings.console_users is not None:
                    response.headers["WWW-Authenticate"] = 'Basic realm="saga-engine console"'
                return response
            return await handler(request)

        return guarded

    async def login_page(request: Request) -> Response:
        try:
            request.state.identity = identify(request, settings, console.sessions)
        except Throttled:
            return _too_many()
        return await _actions.login_form(request)

    routes = [
        Route("/", _pages.home),
        Route("/sagas", gate(_pages.saga_list)),
        Route("/sagas/{saga_id}", gate(_pages.saga_page)),
        Route("/sagas/{saga_id}/events", gate(_live.saga_events, page=False)),
        Route(
            "/sagas/{saga_id}/{action:str}",
            gate(_action_route(_actions.saga_action), page=False),
            methods=["POST"],
        ),
        Route("/dlq", gate(_pages.dead_letter_list)),
        Route("/dlq/{letter:int}", gate(_pages.dead_letter_page)),
        Route("/dlq/{letter:int}/replay", gate(_actions.replay, page=False), methods=["POST"]),
        Route("/stats", gate(_pages.stats_page)),
        Route("/login", login_page),
        Route("/login", _actions.login, methods=["POST"]),
        Route("/logout", _actions.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    app.add_middleware(SecurityHeaders)
    return app


def _too_many() -> Response:
    return Response(
        "too many failed logins: try again in a minute",
        status_code=429,
        headers={"Retry-After": "60"},
    )


def _action_route(handler: Handler) -> Handler:
    """Only the actions there are; anything else under a saga is not found."""

    async def route(request: Request) -> Response:
        if request.path_params["action"] not in ("retry", "cancel"):
            return Response("not found", status_code=404)
        return await handler(request)

    return route


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
