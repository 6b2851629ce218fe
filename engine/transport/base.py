"""The transport seam: everything the engine and the workers need from a broker.

Small on purpose (publish, subscribe, and per-delivery ack / nack / dead-letter) so
that Kafka, RabbitMQ and the in-process broker can all honour the same contract,
which one shared test suite checks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Header names the transports set on dead-lettered messages.
DEAD_LETTER_REASON = "x-dead-letter-reason"
DEAD_LETTER_SOURCE = "x-dead-letter-source"
#: A unique id of one dead-lettering, so the archive keeps a redelivered one once.
DEAD_LETTER_ID = "x-dead-letter-id"


def new_dead_letter_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Message:
    destination: str
    #: Ordering key (the saga id): one key's messages stay in order.
    key: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def dead_letter_copy(original: Message, destination: str, reason: str) -> Message:
    """What every transport parks on its dead-letter destination: the original body and
    key, with why, from where, and an id that lets the archive keep it once."""
    headers = {
        **original.headers,
        DEAD_LETTER_REASON: reason,
        DEAD_LETTER_SOURCE: original.destination,
        DEAD_LETTER_ID: new_dead_letter_id(),
    }
    return Message(destination, original.key, original.body, headers)


class Delivery(Protocol):
    """One received message; exactly one of ack, nack or dead_letter settles it."""

    @property
    def message(self) -> Message: ...

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None:
        """Processed and committed: never deliver again."""
        ...

    async def nack(self) -> None:
        """Not processed: deliver again (to this or another consumer)."""
        ...

    async def dead_letter(self, reason: str) -> None:
        """Cannot ever be processed: park it on the dead-letter destination."""
        ...


@dataclass(frozen=True)
class Mark:
    """A position covering every message the broker held for a subscription when the
    mark was taken (see :meth:`Subscription.mark`)."""

    #: Changes when the subscription lost what it held (a new broker connection or
    #: channel): everything may come again, so earlier marks prove nothing.
    epoch: int
    #: Transport-specific; only the subscription that made the mark reads it.
    position: Any


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def close(self) -> None:
        """Stop receiving; unsettled deliveries go back to the broker for redelivery."""
        ...

    async def mark(self) -> Mark:
        """A mark past every message the broker holds for this subscription now, held
        here unsettled included; raises TransportError when the broker cannot say."""
        ...

    async def settled_past(self, mark: Mark) -> bool:
        """Whether every message covered by ``mark`` has been acked or dead-lettered
        (by this consumer, or by its group). False once the mark can prove nothing
        any more (its epoch ended, a covered message went back to the broker)."""
        ...


@runtime_checkable
class ReaderCheck(Protocol):
    """A transport that can tell whether anyone reads a destination (Kafka: whether a
    consumer group committed offsets on the topic; RabbitMQ: whether a consumer is
    attached to its queue)."""

    async def has_readers(self, destination: str) -> bool: ...

    def nobody_reads(self, destination: str) -> str:
        """``has_readers`` said no, in this broker's words (for a warning)."""
        ...


class Transport(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, messages: Sequence[Message]) -> None:
        """Return only once the broker has confirmed every message (or raise).

        A message the broker refuses for good (too large, an invalid destination, not
        authorised) must not hold up the others: they are still published, and the
        call raises :class:`~engine.errors.MessagesRefused` naming the refused ones
        (by index) once every other message is confirmed. Any other failure (broker
        down, timeouts, no leader) raises PublishError / TransportError for the whole
        call: nothing is known to be confirmed, and all of it is published again.
        """
        ...

    async def subscribe(self, destination: str, *, group: str) -> Subscription:
        """Consume ``destination`` as one member of consumer group ``group``."""
        ...
