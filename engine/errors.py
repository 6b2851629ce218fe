"""Exceptions that cross module boundaries.

Every error a user can provoke with bad input derives from :class:`SagaError`, so the
CLI can turn it into one line on stderr instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping


class SagaError(Exception):
    """Base class of every error saga-engine raises on purpose."""


class DefinitionError(SagaError):
    """A saga definition is malformed; raised when it is built, not when it runs."""


class UnknownSagaError(SagaError):
    """No saga of that name (and version) is registered."""


class InvalidInputError(SagaError):
    """Saga input did not validate against the saga's input model."""


class SagaNotFoundError(SagaError):
    """No saga instance with that id exists in the store."""


class ConfigError(SagaError):
    """A setting (URL, module path, ...) is unusable."""


class DatabaseError(SagaError):
    """The database is missing, unreachable or not migrated."""


class DeadLetterNotFoundError(SagaError):
    """No archived dead letter with that id exists."""


class OperationRefused(SagaError):
    """An operator action (retry, cancel, replay) makes no sense in the current state."""


class ConcurrencyConflict(SagaError):
    """Another writer advanced the saga first (optimistic version check failed)."""


class PublishError(SagaError):
    """The broker did not confirm a message within the bound; it stays in the outbox."""


class MessagesRefused(PublishError):
    """The broker refused some messages of a publish for good and confirmed all the
    others.

    For good: sending them again cannot succeed (too large, an invalid destination, not
    authorised for it). ``refused`` maps each such message's index in the sequence
    given to ``publish`` to the broker's reason; every other message was confirmed.
    """

    def __init__(self, refused: Mapping[int, str], total: int, where: str = "the broker") -> None:
        self.refused = dict(sorted(refused.items()))
        first, reason = next(iter(self.refused.items()))
        super().__init__(
            f"{where} refused {len(self.refused)} of {total} messages for good (#{first}: {reason})"
        )


class MessagesUnroutable(PublishError):
    """No queue receives some messages of a publish (RabbitMQ returned them as
    unroutable); every other message was confirmed, or refused for good (``refused``,
    as in :class:`MessagesRefused`).

    Not for good: a consumer starting later declares its queue and binds it, so these
    messages stay in the outbox and go again. ``unroutable`` maps each one's index in
    the sequence given to ``publish`` to its destination.
    """

    def __init__(
        self,
        unroutable: Mapping[int, str],
        total: int,
        where: str = "the broker",
        refused: Mapping[int, str] | None = None,
    ) -> None:
        self.unroutable = dict(sorted(unroutable.items()))
        self.refused = dict(sorted((refused or {}).items()))
        destinations = ", ".join(sorted(set(self.unroutable.values())))
        super().__init__(
            f"{where} could not route {len(self.unroutable)} of {total} messages: no "
            f"queue receives them (to {destinations})"
        )


class TransportError(SagaError):
    """The broker is unreachable or refused an operation."""


class LimitError(SagaError):
    """An id, a text or a message is over its limit, or holds what the database cannot
    store (NUL); see engine/limits.py."""


class DecodeError(SagaError):
    """A message on the wire is not a valid envelope; it goes to the dead-letter queue."""


class SignatureError(DecodeError):
    """A message is unsigned where signing is required, or its signature does not
    verify (engine/signing.py); dead-lettered like an undecodable one, never handled."""


class BusinessFailure(Exception):
    """Raised by a handler to say "this step failed for a business reason".

    Not retried: the participant's writes for this attempt are rolled back and the saga
    compensates the steps that completed before it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
