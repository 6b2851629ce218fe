"""An in-process broker that behaves like a real one where it matters for correctness.

Delivery is asynchronous, a message stays owned by the broker until acknowledged, a
nack or a closed subscription puts it back for redelivery, and dead letters land on a
destination of their own. Competing consumers of one destination share its queue.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engine.errors import MessagesRefused, TransportError
from engine.transport.base import (
    Mark,
    Message,
    dead_letter_copy,
)


@dataclass
class _Entry:
    message: Message
    deliveries: int = 0
    #: Position in its queue, given when first put there.
    seq: int = -1


@dataclass
class _Queue:
    ready: deque[_Entry] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Entries ever put on the queue, i.e. the next entry's seq.
    published: int = 0
    #: Seqs of the entries not acked or dead-lettered yet (ready or in flight).
    unsettled: set[int] = field(default_factory=set)

    def put(self, entry: _Entry, *, front: bool = False) -> None:
        if entry.seq < 0:
            entry.seq = self.published
            self.published += 1
            self.unsettled.add(entry.seq)
        if front:
            self.ready.appendleft(entry)
        else:
            self.ready.append(entry)
        self.changed.set()

    def settled(self, entry: _Entry) -> None:
        self.unsettled.discard(entry.seq)


class MemoryBroker:
    """Shared by every :class:`MemoryTransport` of one process and event loop."""

    def __init__(
        self, dead_letters: str = "saga.dead-letters", *, max_message_bytes: int | None = None
    ) -> None:
        self.dead_letters = dead_letters
        #: Bodies longer than this are refused for good, as a real broker refuses
        #: messages over its size limit (None: no limit).
        self.max_message_bytes = max_message_bytes
        self._queues: dict[str, _Queue] = {}

    def refusal(self, message: Message) -> str | None:
        """Why this broker would never take ``message``, or None."""
        limit = self.max_message_bytes
        if limit is not None and len(message.body) > limit:
            return f"message of {len(message.body)} bytes is over the limit of {limit} bytes"
        return None

    def queue(self, destination: str) -> _Queue:
        q = self._queues.get(destination)
        if q is None:
            q = self._queues[destination] = _Queue()
        return q

    def depth(self, destination: str) -> int:
        """Messages waiting (not in flight) on ``destination``; for tests and the demo."""
        return len(self.queue(destination).ready)

    def drain(self, destination: str) -> list[Message]:
        """Take every waiting message off ``destination`` (tests read dead letters so)."""
        q = self.queue(destination)
        out = [e.message for e in q.ready]
        for entry in q.ready:
            q.settled(entry)
        q.ready.clear()
        return out


class MemoryDelivery:
    def __init__(self, subscription: MemorySubscription, entry: _Entry, seq: int) -> None:
        self._subscription = subscription
        self._entry = entry
        self.seq = seq
        self._settled = False

    @property
    def message(self) -> Message:
        return self._entry.message

    @property
    def redelivered(self) -> bool:
        return self._entry.deliveries > 1

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._subscription.in_flight.discard(self)
        return True

    async def ack(self) -> None:
        if self._settle():
            self._subscription.queue.settled(self._entry)

    async def nack(self) -> None:
        if self._settle():
            self._subscription.queue.put(self._entry, front=True)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            self._subscription.queue.settled(self._entry)
            broker = self._subscription.broker
            copy = dead_letter_copy(self._entry.message, broker.dead_letters, reason)
            broker.queue(broker.dead_letters).put(_Entry(copy))


class MemorySubscription:
    def __init__(self, broker: MemoryBroker, destination: str) -> None:
        self.broker = broker
        self.queue = broker.queue(destination)
        self.in_flight: set[MemoryDelivery] = set()
        self._seq = itertools.count()
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[MemoryDelivery]:
        while not self._closed:
            if not self.queue.ready:
                self.queue.changed.clear()
                await self.queue.changed.wait()
                continue
            entry = self.queue.ready.popleft()
            entry.deliveries += 1
            delivery = MemoryDelivery(self, entry, next(self._seq))
            self.in_flight.add(delivery)
            yield delivery

    async def mark(self) -> Mark:
        """Everything ever put on the queue so far (its entries keep their place)."""
        return Mark(0, self.queue.published)

    async def settled_past(self, mark: Mark) -> bool:
        position: int = mark.position
        return min(self.queue.unsettled, default=position) >= position

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Like a broker seeing a consumer's connection drop: unacked work returns, in
        # its original order (each nack goes to the front, so the last one goes first).
        for delivery in sorted(self.in_flight, key=lambda d: d.seq, reverse=True):
            await delivery.nack()
        self.queue.changed.set()


class MemoryTransport:
    """The :class:`~engine.transport.base.Transport` over a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()
        self._open = False
        self._subscriptions: list[MemorySubscription] = []
        self._ids = itertools.count()

    async def connect(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        for sub in self._subscriptions:
            await sub.close()
        self._subscriptions.clear()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not self._open:
            raise TransportError("memory transport is not connected")
        refused: dict[int, str] = {}
        for i, message in enumerate(messages):
            reason = self.broker.refusal(message)
            if reason is not None:
                refused[i] = reason
                continue
            self.broker.queue(message.destination).put(_Entry(message))
        await asyncio.sleep(0)  # delivery is asynchronous, as on a real broker
        if refused:
            raise MessagesRefused(refused, len(messages), "the memory broker")

    async def subscribe(self, destination: str, *, group: str) -> MemorySubscription:
        if not self._open:
            raise TransportError("memory transport is not connected")
        sub = MemorySubscription(self.broker, destination)
        self._subscriptions.append(sub)
        return sub
