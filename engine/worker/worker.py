"""Participant definitions: a :class:`Worker` and the handlers registered on it."""

from __future__ import annotations

import hashlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from engine.errors import DefinitionError
from engine.messages import MessageKind


@dataclass(frozen=True)
class HandlerContext:
    """What a handler gets besides its command.

    ``session`` is the worker's database transaction: business writes made with it
    commit together with the barrier row, or not at all. On SQLite it begins at the
    handler's first statement and holds the file's one write lock until the handler
    returns, so a handler does its slow work (calls, waiting) before using it.
    """

    session: AsyncSession
    saga_id: str
    step: str
    attempt: int
    message_id: str
    headers: Mapping[str, str]
    #: The worker handling the command.
    participant: str = ""
    #: Whether this is the step's command or its compensation.
    kind: MessageKind = MessageKind.COMMAND

    @property
    def idempotency_key(self) -> str:
        """A key for this attempt's calls to other services (a payment provider's
        ``Idempotency-Key``), which do not roll back with ``session``.

        The same for every delivery of this attempt (a redelivery after a crash, a
        duplicate), so the provider does the call once however often the handler runs
        for it; different for the next attempt the engine sends after an error, and
        for the compensation, so a retry or a refund is a new call. It is the SHA-256
        hex digest (64 characters of ``0-9a-f``) of the participant, saga id, step,
        direction (``command``/``compensation``) and attempt, joined by NUL (which no
        id may hold). Key a call on ``saga_id`` and ``step`` instead to make it once
        per step across attempts.
        """
        parts = (self.participant, self.saga_id, self.step, self.kind.value, str(self.attempt))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


HandlerResult = BaseModel | Mapping[str, Any] | None
Handler = Callable[[Any, HandlerContext], Awaitable[HandlerResult]]


@dataclass(frozen=True)
class Registration:
    name: str
    kind: MessageKind
    model: type[BaseModel] | None
    handler: Handler

    def parse(self, payload: Mapping[str, Any]) -> Any:
        return self.model.model_validate(payload) if self.model is not None else dict(payload)


def _payload_model(func: Handler) -> type[BaseModel] | None:
    """The pydantic model the first parameter is annotated with, if any."""
    params = list(inspect.signature(func).parameters.values())
    if len(params) != 2:
        raise DefinitionError(
            f"handler {func.__qualname__} must take (command, context), "
            f"it takes {len(params)} parameters"
        )
    hints = typing.get_type_hints(func)
    hint = hints.get(params[0].name)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    return None


class Worker:
    """A participant: named handlers for commands and for compensations.

    >>> inventory = Worker("inventory")
    >>> @inventory.command("reserve_inventory")
    ... async def reserve(cmd: Reserve, ctx: HandlerContext) -> Reserved: ...
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[tuple[MessageKind, str], Registration] = {}

    def command(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: the handler of the command ``name`` (a step's command name). It
        returns the reply, raises BusinessFailure to fail the step, anything else to have
        it retried."""
        return self._register(MessageKind.COMMAND, name)

    def compensation(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: the handler of the compensation ``name``, which undoes a step. It
        must succeed eventually: a failure is retried, then parks the saga."""
        return self._register(MessageKind.COMPENSATION, name)

    def _register(self, kind: MessageKind, name: str) -> Callable[[Handler], Handler]:
        def decorate(func: Handler) -> Handler:
            if not inspect.iscoroutinefunction(func):
                raise DefinitionError(f"handler {func.__qualname__} must be 'async def'")
            if (kind, name) in self.handlers:
                raise DefinitionError(f"worker {self.name!r} has two {kind} handlers {name!r}")
            self.handlers[(kind, name)] = Registration(name, kind, _payload_model(func), func)
            return func

        return decorate

    def registration(self, kind: MessageKind, name: str) -> Registration | None:
        """The handler registered for this kind and name, if any."""
        return self.handlers.get((kind, name))
