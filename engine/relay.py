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

A row no queue receives (RabbitMQ: no queue bound for its destination, as when the
process that wrote it has another ``SAGA_TOPIC_PREFIX``) is not refused for good:
the queue may be declared later, by its consumer starting. It stays pending, the
others go, and its destination is held back with a growing pause (one warning per
destination, naming it) until a publish there is routed. Past ``unroutable_timeout``
(``SAGA_RELAY_UNROUTABLE_TIMEOUT``) no queue is bound yet and the rows are refused
for good, as above, naming the participant no worker serves: the step fails fast
instead of waiting for a queue that may never come.

Where the transport can tell whether anyone reads a destination (Kafka: a consumer
group; RabbitMQ: a consumer on its queue), a while after a publish there the relay
asks, in the background, and warns once if nobody does; it asks again after the
next publishes, so the answer follows workers that start or stop.
:meth:`OutboxRelay.unserved` gives what it knows, which the engine adds to the error
of a step that timed out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from engine._aio import wait_either
from engine.clock import Clock, utc_now
from engine.deadletters import archive_in
from engine.errors import MessagesRefused, MessagesUnroutable, PublishError, TransportError
from engine.faults import crashpoint
from engine.signing import NO_SIGNING, Signing
from engine.store.base import OutboxRecord, OutboxSignal, SagaStore, StoreTransaction
from engine.topology import participant_of
from engine.transport.base import Message, ReaderCheck, Transport, dead_letter_copy

log = logging.getLogger("saga.relay")


@dataclass(frozen=True)
class Undeliverable:
    """An outbox row the broker refused for good, and its reason."""

    record: OutboxRecord
    reason: str


@dataclass
class _Held:
    """A destination no queue received messages for: its rows wait until ``until``
    (``time.monotonic``), then go again; the pause doubles each time. Unroutable
    since ``since``: past the relay's ``unroutable_timeout``, its rows are refused."""

    until: float
    pause: float
    since: float


#: What the engine does about refused rows, inside the relay's transaction (the
#: rows are taken out of the outbox there); returns what to do once it committed.
UndeliverableHandler = Callable[
    [StoreTransaction, Sequence[Undeliverable]], Awaitable[Callable[[], None] | None]
]


class RelayOptions(TypedDict, total=False):
    """The relay's tunables an operator sets (``SAGA_RELAY_*``), as keyword arguments
    of :class:`OutboxRelay` (seconds for the pauses)."""

    batch_size: int
    poll_interval: float
    unroutable_pause: float
    max_unroutable_pause: float
    unroutable_timeout: float
    reader_check_delay: float


class OutboxRelay:
    """Publishes committed outbox rows and marks them sent once the broker confirmed
    them; any number of replicas may run (rows are claimed, skipped by the others)."""

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
        unroutable_pause: float = 1.0,
        max_unroutable_pause: float = 30.0,
        unroutable_timeout: float = 10.0,
        reader_check_delay: float = 10.0,
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
        #: First and longest pause before rows no queue received go again.
        self.unroutable_pause = unroutable_pause
        self.max_unroutable_pause = max_unroutable_pause
        #: How long rows no queue receives stay pending before they are refused.
        self.unroutable_timeout = unroutable_timeout
        #: Destinations held back, their rows pending (see module docstring).
        self.held: dict[str, _Held] = {}
        #: How long after a publish to a destination its readers are looked for
        #: (workers started with the engine have joined their groups by then).
        self.reader_check_delay = reader_check_delay
        #: The last answer of the transport for each destination asked about.
        self.read: dict[str, bool] = {}
        #: When each destination was last published to (``time.monotonic``).
        self._published_at: dict[str, float] = {}
        self._checking: dict[str, asyncio.Task[None]] = {}
        self._checks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """New rows were committed: publish without waiting to poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows left the outbox (sent or refused)."""
        refused: list[Undeliverable] = []
        given_up: list[Undeliverable] = []
        after: Callable[[], None] | None = None
        held: dict[int, str] = {}
        now = time.monotonic()
        waiting = {d for d, h in self.held.items() if h.until > now}
        async with self.store.transaction() as tx:
            rows = await tx.claim_outbox(self.batch_size, skip=waiting)
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
            except MessagesUnroutable as exc:  # the same, and these stay pending
                held = exc.unroutable
                refused = [Undeliverable(rows[i], why) for i, why in exc.refused.items()]
                given_up = self._give_up(rows, held)
                refused += given_up
            except TimeoutError:
                raise PublishError(
                    f"broker did not confirm {len(messages)} messages "
                    f"within {self.publish_timeout:g}s"
                ) from None
            crashpoint("relay.after_publish")
            await tx.mark_sent([r.id for i, r in enumerate(rows) if i not in held], self.clock())
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
        self._note_routes(rows, held, {item.record.destination for item in given_up})
        self.published += len(rows) - len(refused) - len(held)
        self.refused += len(refused)
        return len(rows) - len(held)

    def _give_up(self, rows: Sequence[OutboxRecord], held: dict[int, str]) -> list[Undeliverable]:
        """The rows of ``held`` whose destination no queue has received for longer than
        ``unroutable_timeout``, taken out of ``held``: refused for good."""
        now = time.monotonic()
        refused = []
        for i, destination in list(held.items()):
            before = self.held.get(destination)
            if before is not None and now - before.since >= self.unroutable_timeout:
                del held[i]
                refused.append(Undeliverable(rows[i], self._no_queue(destination)))
        return refused

    def _no_queue(self, destination: str) -> str:
        """Why rows to ``destination`` are refused after ``unroutable_timeout``."""
        participant = participant_of(destination)
        return f"no queue is bound for {destination} after {self.unroutable_timeout:g}s" + (
            f": no worker serves participant {participant!r}" if participant else ""
        )

    def unserved(self, destination: str) -> str | None:
        """What this relay knows of nobody receiving ``destination``'s messages, in
        words for a step's error (``no worker consumes 'saga.commands.x' (participant
        'x')``); None if it knows of nothing wrong. As of its last publish or reader
        check there: another replica's relay may know better."""
        participant = participant_of(destination)
        whose = f" (participant {participant!r})" if participant else ""
        if destination in self.held:
            return f"no queue is bound for {destination!r}{whose}"
        if self.read.get(destination) is False:
            return f"no worker consumes {destination!r}{whose}"
        return None

    def _note_routes(
        self, rows: Sequence[OutboxRecord], held: dict[int, str], given_up: set[str]
    ) -> None:
        """Hold back the destinations no queue received, stop holding back those whose
        rows were refused (``given_up``), release the ones routed now, and have the
        readers of each destination published to looked for."""
        now = time.monotonic()
        for destination in sorted(set(held.values())):
            count = sum(1 for d in held.values() if d == destination)
            before = self.held.get(destination)
            if before is None:
                log.warning(
                    "no queue receives messages to %s: %d outbox row(s) stay pending and "
                    "go again once a queue is bound to it (its consumer declares it when "
                    "it starts); do all processes share one SAGA_TOPIC_PREFIX?",
                    destination,
                    count,
                )
                pause, since = self.unroutable_pause, now
            else:
                log.debug("still no queue receives messages to %s", destination)
                pause, since = min(self.max_unroutable_pause, before.pause * 2), before.since
            # Tried again by the time its rows are to be refused, not a pause later.
            until = min(now + pause, since + self.unroutable_timeout)
            self.held[destination] = _Held(until, pause, since)
        for destination in given_up:
            # Its rows were refused: the next ones are tried (and refused) at once.
            self.held[destination].until = now
        for destination in sorted({r.destination for r in rows} - set(held.values()) - given_up):
            if self.held.pop(destination, None) is not None:
                log.info("messages to %s are routed again: the pending rows went", destination)
            self._published_at[destination] = now
            if destination not in self._checking and isinstance(self.transport, ReaderCheck):
                task = asyncio.create_task(self._check_readers(self.transport, destination))
                self._checking[destination] = task
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _check_readers(self, transport: ReaderCheck, destination: str) -> None:
        """Ask whether anyone reads ``destination`` a while after a publish there, and
        again while publishes came after what the last answer covers; warn when it
        turns out nobody does (off the hot path)."""
        try:
            while True:
                await asyncio.sleep(self.reader_check_delay)
                covers = time.monotonic() - self.reader_check_delay
                try:
                    read = await transport.has_readers(destination)
                except Exception as exc:  # a question only: never a reason to stop relaying
                    log.debug("could not tell who reads %s: %s", destination, exc)
                    return
                if not read and self.read.get(destination) is not False:
                    log.warning(
                        "%s: its messages wait there unread (is a consumer of it running, "
                        "with the same SAGA_TOPIC_PREFIX?)",
                        transport.nobody_reads(destination),
                    )
                self.read[destination] = read
                if self._published_at.get(destination, covers) <= covers:
                    return
        finally:
            self._checking.pop(destination, None)

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
            for task in list(self._checks):
                task.cancel()
            await asyncio.gather(*self._checks, return_exceptions=True)
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
