"""The outbox relay: moves committed outbox rows to the broker.

Rows are claimed (locked, skipped by other replicas), published, and marked sent in
the same transaction only after the broker confirmed them. A crash between publish
and mark means the rows are published again: duplicates are expected downstream and
absorbed by the inbox and the participant barrier.
"""

from __future__ import annotations

import asyncio
import logging

from engine._aio import wait_either
from engine.clock import Clock, utc_now
from engine.errors import PublishError, TransportError
from engine.faults import crashpoint
from engine.store.base import OutboxSignal, SagaStore
from engine.transport.base import Message, Transport

log = logging.getLogger("saga.relay")


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
        self.published = 0
        #: False after a failed publish, until one succeeds (the daemon's readiness check).
        self.healthy = True

    def wake(self) -> None:
        """New rows were committed: publish without waiting to poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows were sent."""
        async with self.store.transaction() as tx:
            rows = await tx.claim_outbox(self.batch_size)
            if not rows:
                return 0
            messages = [Message(r.destination, r.key, r.body, r.headers) for r in rows]
            crashpoint("relay.before_publish")
            try:
                await asyncio.wait_for(
                    self.transport.publish(messages), timeout=self.publish_timeout
                )
            except TimeoutError:
                raise PublishError(
                    f"broker did not confirm {len(messages)} messages "
                    f"within {self.publish_timeout:g}s"
                ) from None
            crashpoint("relay.after_publish")
            await tx.mark_sent([r.id for r in rows], self.clock())
        self.published += len(rows)
        return len(rows)

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
