"""The console's settings: every ``SAGA_*`` setting, and ``SAGA_CONSOLE_*``.

Like every setting, each may come from a file (``SAGA_CONSOLE_TOKEN_FILE``); the
token and the passwords are ``SecretStr``, so :mod:`engine.redact` hides them from
every text the process writes, and no page shows them.
"""

from __future__ import annotations

import hmac
from typing import Any

from pydantic import SecretStr, ValidationError, field_validator

from engine.errors import ConfigError, LimitError
from engine.limits import check_actor
from engine.redact import remember
from engine.settings import Settings, bad_settings

#: The shortest token accepted: a short one could be guessed through the login form.
MIN_TOKEN_LENGTH = 16
#: The shortest password accepted (also what :mod:`engine.redact` hides everywhere).
MIN_PASSWORD_LENGTH = 8


class ConsoleSettings(Settings):
    """``SAGA_CONSOLE_*`` over the process's settings (the database, the sagas)."""

    #: Offer operator actions (retry, cancel, dead-letter replay) to authenticated
    #: users; off: the console only reads.
    console_actions: bool = False
    #: A bearer token (``Authorization: Bearer ...`` or the login form); at least
    #: :data:`MIN_TOKEN_LENGTH` characters.
    console_token: SecretStr | None = None
    #: The name recorded as the actor of what a token holder does.
    console_token_user: str = "console"
    #: ``user:password`` pairs, comma-separated (a password holds no comma; the first
    #: colon ends the name): basic auth or the login form.
    console_users: SecretStr | None = None
    #: A trace viewer's URL with ``{trace_id}`` (Jaeger: ``http://host:16686/trace/
    #: {trace_id}``); unset: trace ids are shown, not linked.
    console_trace_url: str | None = None

    @field_validator("console_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            # A ConfigError, not a ValueError: pydantic would quote the input.
            raise ConfigError(
                f"bad setting SAGA_CONSOLE_TOKEN: must be at least {MIN_TOKEN_LENGTH} characters"
            )
        return value

    @field_validator("console_token_user")
    @classmethod
    def _token_user(cls, value: str) -> str:
        try:
            check_actor(value, "the token's user name")
        except LimitError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("console_users")
    @classmethod
    def _users(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        try:
            users = parse_users(value.get_secret_value())
        except ValueError as exc:
            raise ConfigError(f"bad setting SAGA_CONSOLE_USERS: {exc}") from None
        for password in users.values():  # each one, not only the whole list
            remember(password)
        return value

    @field_validator("console_trace_url")
    @classmethod
    def _trace_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")) or "{trace_id}" not in value:
            raise ValueError("must be an http(s) URL holding {trace_id}")
        return value

    @property
    def users(self) -> dict[str, str]:
        """``SAGA_CONSOLE_USERS`` as user name -> password."""
        if self.console_users is None:
            return {}
        return parse_users(self.console_users.get_secret_value())

    @property
    def has_credentials(self) -> bool:
        """Whether a token or users are configured: then every page needs them."""
        return self.console_token is not None or self.console_users is not None

    def authenticate(self, user: str | None, secret: str) -> str | None:
        """The name of whom ``user`` and ``secret`` authenticate (compared in constant
        time), else None: a configured user and their password, or the token (its
        holder's name is :attr:`console_token_user`)."""
        found: str | None = None
        encoded = secret.encode("utf-8", "surrogatepass")
        if self.console_token is not None:
            token = self.console_token.get_secret_value().encode("utf-8")
            if hmac.compare_digest(encoded, token):
                found = self.console_token_user
        for name, password in self.users.items():
            # Every pair is compared, so the time taken says nothing of which matched.
            same_name = hmac.compare_digest(name.encode(), (user or "").encode())
            if hmac.compare_digest(encoded, password.encode("utf-8")) and same_name:
                found = name
        return found


def parse_users(text: str) -> dict[str, str]:
    """``alice:secret,bob:other`` as a mapping; a ValueError naming what is wrong
    (never a password)."""
    users: dict[str, str] = {}
    for position, pair in enumerate(text.split(","), start=1):
        if not pair.strip():
            continue
        name, colon, password = pair.strip().partition(":")
        if not colon or not name:
            raise ValueError(f"pair {position} is not user:password")
        try:
            check_actor(name, f"user name {position}")
        except LimitError as exc:
            raise ValueError(str(exc)) from None
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(
                f"the password of user {name!r} must be at least {MIN_PASSWORD_LENGTH} characters"
            )
        if name in users:
            raise ValueError(f"user {name!r} is named twice")
        users[name] = password
    return users


def load_console_settings(**overrides: Any) -> ConsoleSettings:
    """The console's settings: ``overrides`` over the ``SAGA_*`` environment and
    ``SAGA_<NAME>_FILE`` files; a bad one is a one-line ConfigError without its value."""
    try:
        return ConsoleSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(bad_settings(exc)) from None
