"""Who a request comes from, and whether it may act.

Three ways in, when credentials are configured (``SAGA_CONSOLE_TOKEN``,
``SAGA_CONSOLE_USERS``):

- ``Authorization: Bearer <token>`` (scripts, curl);
- ``Authorization: Basic ...`` for a configured user;
- the login form, which sets a session cookie (``HttpOnly``, ``SameSite=Strict``)
  naming a session held in this process's memory (a restart logs everyone out).

A POST that acts must carry the session's CSRF token in its form, unless it came
with a bearer token (a header no other site can make a browser send). Basic
credentials are sent by the browser by itself, like a cookie, so they need the
form's token too; theirs is derived from the user name with a key of this process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from starlette.requests import HTTPConnection

from engine.console._settings import ConsoleSettings

#: The session cookie's name.
COOKIE = "saga_console_session"
#: How long a login lasts without use (seconds).
SESSION_IDLE = 8 * 3600
#: Most sessions kept; the least recently used go first.
MAX_SESSIONS = 1000
#: Failed logins (form, bearer or basic) allowed per :data:`FAILURE_WINDOW` seconds,
#: all clients together; past that, credentials are not even checked until the
#: window has moved on (sessions already open go on working).
MAX_FAILURES = 30
FAILURE_WINDOW = 60.0

Via = Literal["bearer", "basic", "session"]


@dataclass(frozen=True)
class Identity:
    """An authenticated user: their name (the actor recorded), how they came in, and
    the CSRF token their forms carry (None for a bearer token, which needs none)."""

    user: str
    via: Via
    csrf: str | None


@dataclass
class _Session:
    user: str
    csrf: str
    seen: float


class Sessions:
    """Logins made through the form, by a random session id (never a secret of the
    settings: the cookie proves a login, it does not carry the password)."""

    def __init__(self) -> None:
        self._by_id: dict[str, _Session] = {}
        #: Signs the CSRF tokens of basic-auth users; new with each process.
        self._key = secrets.token_bytes(32)
        #: When the recent failed logins were (monotonic seconds).
        self._failures: deque[float] = deque()
        self.max_failures = MAX_FAILURES

    def failed(self) -> None:
        """Count a failed login."""
        self._failures.append(time.monotonic())

    def throttled(self) -> bool:
        """Whether too many logins failed lately to check another one: guessing a
        password or the token through the console is bounded."""
        horizon = time.monotonic() - FAILURE_WINDOW
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()
        return len(self._failures) >= self.max_failures

    def open(self, user: str) -> str:
        """A new session for ``user``; returns its id (the cookie's value)."""
        self._expire()
        if len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id, key=lambda k: self._by_id[k].seen)
            del self._by_id[oldest]
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = _Session(user, secrets.token_urlsafe(32), time.monotonic())
        return session_id

    def close(self, session_id: str | None) -> None:
        """Log a session out."""
        if session_id is not None:
            self._by_id.pop(session_id, None)

    def find(self, session_id: str | None) -> _Session | None:
        """The live session of that id, its idle time reset."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        now = time.monotonic()
        if session is None or now - session.seen > SESSION_IDLE:
            self._by_id.pop(session_id, None)
            return None
        session.seen = now
        return session

    def basic_csrf(self, user: str) -> str:
        """The CSRF token of a basic-auth user's forms."""
        return hmac.new(self._key, f"basic:{user}".encode(), hashlib.sha256).hexdigest()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._by_id.items() if now - s.seen > SESSION_IDLE]:
            del self._by_id[key]


class Throttled(Exception):
    """Too many logins failed lately: this one is not checked (HTTP 429)."""


def identify(
    conn: HTTPConnection, settings: ConsoleSettings, sessions: Sessions
) -> Identity | None:
    """Who sent this request, if anyone authenticated; None otherwise (also when no
    credentials are configured: then nobody can act). Raises :class:`Throttled`
    for credentials in a header while too many logins fail."""
    if not settings.has_credentials:
        return None
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "basic") and value:
        if sessions.throttled():
            raise Throttled()
        identity = _from_header(scheme.lower(), value.strip(), settings, sessions)
        if identity is None:
            sessions.failed()
        return identity
    session = sessions.find(conn.cookies.get(COOKIE))
    if session is not None:
        return Identity(session.user, "session", session.csrf)
    return None


def _from_header(
    scheme: str, value: str, settings: ConsoleSettings, sessions: Sessions
) -> Identity | None:
    if scheme == "bearer":
        user = settings.authenticate(None, value) if settings.console_token else None
        # A bearer token authenticates the token's holder only, never a user.
        if user is not None and user == settings.console_token_user:
            return Identity(user, "bearer", None)
        return None
    name, password = _basic(value)
    user = settings.authenticate(name, password) if name is not None else None
    if user is not None and settings.users.get(user) is not None and user == name:
        return Identity(user, "basic", sessions.basic_csrf(user))
    return None


def _basic(value: str) -> tuple[str | None, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else (None, "")


def csrf_ok(identity: Identity, sent: str | None) -> bool:
    """Whether a POST's form carries the token its identity needs (constant time)."""
    if identity.csrf is None:
        return True
    return sent is not None and hmac.compare_digest(sent.encode(), identity.csrf.encode())
