"""The console's POSTs: log in and out, and the operator actions.

An action runs only when ``SAGA_CONSOLE_ACTIONS`` is on and the request is
authenticated; it records the authenticated user as the actor, through the same
:class:`~engine.client.SagaClient` methods as ``sagactl retry / cancel / dlq replay``.
"""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from engine.console._auth import COOKIE, Identity, csrf_ok
from engine.console._pages import console_of
from engine.errors import DeadLetterNotFoundError, SagaError, SagaNotFoundError

#: The largest form body read (a reason is at most a few KiB).
MAX_FORM_BYTES = 16 * 1024


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (no multipart: nothing is
    uploaded), each field's first value."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _same_origin(request: Request) -> bool:
    """A browser's POST names the page it came from: it must be this console, as the
    browser reached it (``Host``, or a reverse proxy's ``X-Forwarded-Host``)."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser (browsers send it with every POST)
        return True
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    return urlsplit(origin).netloc in hosts - {None}


async def login_form(request: Request) -> Response:
    """``/login``: a form for a configured user's password, or the token."""
    console = console_of(request)
    return console.page(request, "login.html", {"error": None, "next": _next(request)})


def _next(request: Request, value: str | None = None) -> str:
    """Where to go after logging in: a path of this console only."""
    target = value if value is not None else request.query_params.get("next", "/sagas")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/sagas"
    return target


async def login(request: Request) -> Response:
    """Check the credentials; open a session and set its cookie."""
    console = console_of(request)
    form = await read_form(request)
    next_path = _next(request, form.get("next"))
    if not console.settings.has_credentials:
        error = "no credentials are configured: the console only reads"
        return console.page(request, "login.html", {"error": error, "next": next_path}, 403)
    if not _same_origin(request):
        return console.page(
            request, "login.html", {"error": "cross-site login refused", "next": next_path}, 403
        )
    if console.sessions.throttled():
        error = "too many failed logins: try again in a minute"
        return console.page(request, "login.html", {"error": error, "next": next_path}, 429)
    user = console.settings.authenticate(form.get("user") or None, form.get("password", ""))
    if user is None:
        console.sessions.failed()
        error = "wrong user name, password or token"
        return console.page(request, "login.html", {"error": error, "next": next_path}, 401)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE,
        console.sessions.open(user),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    """End the session."""
    console = console_of(request)
    console.sessions.close(request.cookies.get(COOKIE))
    response = RedirectResponse("/sagas", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def _allowed(request: Request) -> tuple[Identity | None, dict[str, str], Response | None]:
    """The actor and the form of an action, or the response refusing it."""
    console = console_of(request)
    identity: Identity | None = getattr(request.state, "identity", None)
    if not console.settings.console_actions:
        return None, {}, _refused(request, 403, "actions are off (SAGA_CONSOLE_ACTIONS)")
    if identity is None:
        return None, {}, _refused(request, 401, "log in to act")
    form = await read_form(request)
    if not _same_origin(request) or not csrf_ok(identity, form.get("csrf")):
        return (
            None,
            {},
            _refused(request, 403, "refused: the form's CSRF token is missing or wrong"),
        )
    reason = form.get("reason", "").strip() or None
    form["reason"] = reason or ""
    return identity, form, None


def _refused(request: Request, status: int, why: str) -> Response:
    console = console_of(request)
    response = console.page(request, "error.html", {"title": "Refused", "error": why}, status)
    if status == 401 and console.settings.console_users is not None:
        response.headers["WWW-Authenticate"] = 'Basic realm="saga-engine console"'
    return response


async def saga_action(request: Request) -> Response:
    """``POST /sagas/{id}/retry`` and ``/cancel``."""
    identity, form, refusal = await _allowed(request)
    if refusal is not None:
        return refusal
    assert identity is not None
    console = console_of(request)
    saga_id = request.path_params["saga_id"]
    action = request.path_params["action"]
    reason = form["reason"] or None
    try:
        if action == "retry":
            await console.client.retry(saga_id, actor=identity.user, reason=reason)
        else:
            await console.client.cancel(saga_id, actor=identity.user, reason=reason)
    except SagaNotFoundError as exc:
        return _refused(request, 404, str(exc))
    except SagaError as exc:  # refused, kept changing, over a limit, not loaded here
        return _refused(request, 409, str(exc))
    return RedirectResponse(f"/sagas/{quote(saga_id, safe='')}", status_code=303)


async def replay(request: Request) -> Response:
    """``POST /dlq/{id}/replay``: send a dead letter back where it came from."""
    identity, form, refusal = await _allowed(request)
    if refusal is not None:
        return refusal
    assert identity is not None
    console = console_of(request)
    letter = request.path_params["letter"]
    try:
        await console.client.replay_dead_letter(
            letter, actor=identity.user, reason=form["reason"] or None
        )
    except DeadLetterNotFoundError as exc:
        return _refused(request, 404, str(exc))
    except SagaError as exc:
        return _refused(request, 409, str(exc))
    return RedirectResponse(f"/dlq/{letter}", status_code=303)
