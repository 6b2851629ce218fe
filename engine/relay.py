"""The outbox relay: moves committed outbox rows to the broker.

Rows are claimed (locked, skipped by other replicas), published, and marked sent in
the same transaction only after the broker confirmed them. A crash between publish
and mark means the rows are published again: duplicates are expected downstream and
absorbed by the inbox and the participant barrier.

A row the broker refuses for good (too large, an invalid destination, not authorised)
must not hold up the rows behind it: in that same transaction it leaves the outbox
(marked sent: publishing it again cannot succeed), is archived as a dead letter, and
is handed to the engine, which advances its saga (the step fails, or the saga parks).
A failure that is not a refusal of particular messages keeps every row pending, in
order, for the next attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from engine._aio import wait_either
from engine.clock import Clock, utc_now
from engine.deadletters import archive_in
from engine.errors import MessagesRefused, PublishError, TransportError
from engine.faults import crashpoint
from engine.signing import NO_SIGNING, Signing
from engine.store.base import OutboxRecord, OutboxSignal, SagaStore, StoreTransaction
from engine.transport.base import Message, Transport, dead_letter_copy

log = logging.getLogger("saga.relay")


@dataclass(frozen=True)
class Undeliverable:
    """An outbox row the broker refused for good, and its reason."""

    record: OutboxRecord
    reason: str


#: What the engine does about refused rows, inside the relay's transaction (the
#: rows are taken out of the outbox there); returns what to do once it committed.
UndeliverableHandler = Callable[
    [StoreTransaction, Sequence[Undeliverable]], Awaitable[Callable[[], None] | None]
]


class OutboxRelay:
    def __init__(
        self,
        store: SagaStore,
        transport: Transport,
        *,
        clock: Clock = utc_now,
        batch_size: int = 200,
        poll_interval: float = 0.05,
        publish_timeout: float = 10.0,
        max_backoff: float = 5.0,
        signal: OutboxSignal | None = None,
        on_undeliverable: UndeliverableHandler | None = None,
        signing: Signing = NO_SIGNING,
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.max_backoff = max_backoff
        #: Wakes this relay when another process commits outbox rows (PostgreSQL:
        #: LISTEN / NOTIFY); without one, such rows wait for the next poll.
        self.signal = signal
        self._wake = asyncio.Event()
        #: Advances the sagas of refused rows (the engine's); without one, a refused
        #: row is still taken out, archived and logged.
        self.on_undeliverable = on_undeliverable
        #: Signs every row as it goes out: the one place the engine's commands and
        #: compensations (and whatever ``sagactl`` put in the outbox) leave it.
        self.signing = signing
        self.published = 0
        #: Rows the broker refused for good, taken out of the outbox.
        self.refused = 0
        #: False after a failed publish, until one succeeds (the daemon's readiness check).
        self.healthy = True

    def wake(self) -> None:
        """New rows were committed: publish without waiting to poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows left the outbox (sent or refused)."""
        refused: list[Undeliverable] = []
        after: Callable[[], None] | None = None
        async with self.store.transaction() as tx:
            rows = await tx.claim_outbox(self.batch_size)
            if not rows:
                return 0
            messages = [self._message(r) for r in rows]
            crashpoint("relay.before_publish")
            try:
                await asyncio.wait_for(
                    self.transport.publish(messages), timeout=self.publish_timeout
                )
            except MessagesRefused as exc:  # every other message was confirmed
                refused = [Undeliverable(rows[i], why) for i, why in exc.refused.items()]
            except TimeoutError:
                raise PublishError(
                    f"broker did not confirm {len(messages)} messages "
                    f"within {self.publish_timeout:g}s"
                ) from None
            crashpoint("relay.after_publish")
            await tx.mark_sent([r.id for r in rows], self.clock())
            if refused:
                after = await self._set_aside(tx, refused)
        if after is not None:
            after()
        for item in refused:
            log.error(
                "outbox row %d (key %s) to %s refused by the broker for good, dead-lettered: %s",
                item.record.id,
                item.record.key,
                item.record.destination,
                item.reason,
            )
        if refused:
            self.wake()  # the sagas' next messages (compensations) are waiting
        self.published += len(rows) - len(refused)
        self.refused += len(refused)
        return len(rows)

    async def _set_aside(
        self, tx: StoreTransaction, refused: Sequence[Undeliverable]
    ) -> Callable[[], None] | None:
        """Hand the refused rows to the engine (which locks their sagas first) and
        archive them as dead letters, in the relay's transaction."""
        after = None
        if self.on_undeliverable is not None:
            after = await self.on_undeliverable(tx, refused)
        now = self.clock()
        for item in refused:
            original = self._message(item.record)
            # Archived here, never published: the copy's own destination does not matter.
            await archive_in(tx, dead_letter_copy(original, original.destination, item.reason), now)
        return after

    def _message(self, record: OutboxRecord) -> Message:
        """The message of an outbox row, signed as it is sent."""
        return self.signing.sign(
            Message(record.destination, record.key, record.body, record.headers)
        )

    async def run(self, stop: asyncio.Event) -> None:
        listener = None
        if self.signal is not None:
            listener = asyncio.create_task(
                self.signal.listen(self.wake, stop), name="saga-relay-listener"
            )
        try:
            await self._run(stop)
        finally:
            if listener is not None:  # it closes its connection on the way out
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = self.poll_interval
        while not stop.is_set():
            self._wake.clear()
            try:
                sent = await self.relay_once()
            except Exception as exc:  # broker or database down: rows stay pending
                level = (
                    logging.WARNING
                    if isinstance(exc, PublishError | TransportError)
                    else logging.ERROR
                )
                log.log(level, "outbox publish failed, rows stay pending: %s", exc)
                self.healthy = False
                backoff = min(self.max_backoff, max(backoff * 2, 0.1))
                await wait_either(stop, None, backoff)
                continue
            backoff = self.poll_interval
            self.healthy = True
            if sent == self.batch_size:
                continue  # more are waiting
            await wait_either(stop, self._wake, self.poll_interval)
