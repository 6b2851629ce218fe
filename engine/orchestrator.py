"""The orchestrator: composes the engine's components and runs them together.

Its parts, each with its own module: the reply consumer (:mod:`engine.consumer`),
the timer scanner (:mod:`engine.timers`), the deferred-reply scan
(:mod:`engine.deferred`), the held-saga scan and registration (:mod:`engine.held`,
:mod:`engine.served`), the outbox relay (:mod:`engine.relay`) and the dead-letter
archive (:mod:`engine.deadletters`); all of them advance sagas through one
:class:`~engine.advance.Advancer`. Every change to a saga happens in one store
transaction that also records the reply's message id (inbox) and the messages the
change emits (outbox); the broker delivery is acknowledged only after that
transaction committed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from engine.advance import Advancer
from engine.clock import Clock, utc_now
from engine.consumer import ACK, Ack, DeadLetter, Failed, Nack, ReplyConsumer, Settlement
from engine.deadletters import DeadLetterArchive
from engine.deferred import DeferredReplyScan
from engine.held import HeldSagaScan
from engine.limits import DEFAULT_LIMITS, Limits
from engine.messages import Envelope
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.replies import ReplyOutcome, ReplyResult
from engine.served import Registration
from engine.signing import NO_SIGNING, Signing
from engine.store.base import SagaStore
from engine.timers import StoreTimerScanner, TimerScanner, scan_timers
from engine.topology import Topology
from engine.transport.base import Delivery, Message, Transport
from engine.watermark import ReplyWatermark

log = logging.getLogger("saga.engine")

__all__ = [
    "ACK",
    "Ack",
    "DeadLetter",
    "Engine",
    "EngineSettings",
    "Failed",
    "Nack",
    "ReplyOutcome",
    "ReplyResult",
    "Settlement",
]


@dataclass(frozen=True)
class EngineSettings:
    """The engine's tunables: its consumer group, timer scan, batching, patience with
    replies that come early, and the reply watermark. The daemon builds them from the
    ``SAGA_*`` settings; the defaults suit one engine on a small machine."""

    group: str = "saga-engine"
    #: Pause of the timer scanner when a scan fired less than a full batch (seconds).
    timer_interval: float = 0.1
    #: Most timers fired in one transaction.
    timer_batch: int = 100
    #: Most replies applied in one transaction.
    reply_batch: int = 100
    #: How long a reply whose saga is not visible is kept and retried (set aside, never
    #: holding the consumer) before it is dead-lettered.
    unknown_saga_patience: float = 10.0
    #: First pause before a deferred reply is retried; it doubles up to the cap.
    deferred_backoff: float = 0.05
    deferred_backoff_max: float = 1.0
    #: Pause of the deferred-reply scan when nothing was due (it is woken at once when
    #: this engine sets a reply aside), and most rows per scan.
    deferred_interval: float = 0.25
    deferred_batch: int = 100
    conflict_retries: int = 20
    #: Tries of a reply (or dead letter) that fails with an error that is not transient
    #: (a value the database refuses, a bug) before it is dead-lettered with the error,
    #: and the pause between them.
    failure_attempts: int = 3
    failure_backoff: float = 0.1
    #: Pause after a transient error (e.g. the database is down) before going on.
    error_backoff: float = 1.0
    #: Consume the dead-letter destination into the saga_dead_letters table.
    archive_dead_letters: bool = True
    # The reply watermark (engine/watermark.py): a step or compensation timeout fires
    # only once every reply that was in the broker when it fell due is applied...
    #: ...or once it is this overdue, whatever the reply consumer's lag.
    timeout_hold: timedelta = timedelta(seconds=120)
    #: After the engine starts, how long before marks count: longer than a worker's
    #: backoff (5s at most) before it republishes a reply. After the broker was
    #: unreachable, as long as it was, and at least this.
    reply_settle: timedelta = timedelta(seconds=6)
    #: How often the watermark takes a mark of the reply subscription (seconds).
    watermark_interval: float = 0.5
    #: Pause of the held-saga scan when nothing was resumable (it is woken at once
    #: when this engine keeps a reply for a saga it serves), and most sagas per scan.
    held_interval: float = 1.0
    held_batch: int = 100
    #: How often the engine refreshes its registration of what it serves (a
    #: registration lives three of these); 0: it does not register.
    heartbeat_interval: float = 5.0


class Engine:
    """The orchestrator: consumes replies, fires due timers, relays the outbox and
    archives dead letters, advancing each saga through one unit of work (``advance``).

    Any number of engines may share a database and a broker: each saga row has one
    writer at a time, and a reply or timer is applied once whichever engine takes it.
    ``run`` until ``stop``; ``sagactl engine`` runs one with signals and a clean drain.

    ``relay`` and ``timers`` replace the default components (the relay the root
    configures from ``SAGA_RELAY_*``; a fake scanner in tests); by default the timer
    scanner is the store-backed one over this engine's :attr:`advancer`.
    """

    def __init__(
        self,
        store: SagaStore,
        transport: Transport,
        registry: SagaRegistry,
        *,
        topology: Topology | None = None,
        clock: Clock = utc_now,
        settings: EngineSettings | None = None,
        relay: OutboxRelay | None = None,
        rng: random.Random | None = None,
        instance_id: str | None = None,
        messaging_system: str = "memory",
        limits: Limits = DEFAULT_LIMITS,
        signing: Signing = NO_SIGNING,
        timers: TimerScanner | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.registry = registry
        self.topology = topology or Topology()
        self.clock = clock
        self.settings = settings or EngineSettings()
        #: Checks every reply before it is decoded; the engine's relay signs with it
        #: what the engine sends.
        self.signing = signing
        self.relay = relay or OutboxRelay(store, transport, clock=clock)
        if self.relay.signing is NO_SIGNING:
            self.relay.signing = signing
        self.archive = DeadLetterArchive(
            store,
            clock=clock,
            failure_attempts=self.settings.failure_attempts,
            failure_backoff=self.settings.failure_backoff,
        )
        self.rng = rng or random.Random()
        self.instance_id = instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self.timers_fired = 0
        #: ``messaging.system`` trace attribute of the transport.
        self.messaging_system = messaging_system
        #: Replies over them are dead-lettered; built commands over them fail the step.
        self.limits = limits
        settings = self.settings
        #: Advances the sagas of every event this engine takes: replies (live and
        #: deferred), due timers, and the messages the broker refused its relay.
        self.advancer = Advancer(
            registry,
            topology=self.topology,
            clock=clock,
            rng=self.rng,
            limits=limits,
            messaging_system=messaging_system,
            group=settings.group,
            wake=self.relay.wake,
        )
        if self.relay.on_undeliverable is None:
            self.relay.on_undeliverable = self.advancer.undeliverable
        self.advancer.unserved = self.relay.unserved
        self.deferred = DeferredReplyScan(
            store,
            self.advancer.replies,
            self.advancer.committed,
            source=self.topology.replies,
            clock=clock,
            patience=settings.unknown_saga_patience,
            backoff=settings.deferred_backoff,
            backoff_max=settings.deferred_backoff_max,
            interval=settings.deferred_interval,
            batch=settings.deferred_batch,
            failure_attempts=settings.failure_attempts,
            failure_backoff=settings.failure_backoff,
            error_backoff=settings.error_backoff,
        )
        self.advancer.wake_deferred = self.deferred.wake.set
        #: Applies the replies of the engine's subscription and settles their deliveries.
        self.consumer = ReplyConsumer(
            store,
            self.advancer,
            self.deferred,
            stop=self._stop,
            clock=clock,
            signing=signing,
            limits=limits,
            batch=settings.reply_batch,
            unknown_saga_patience=settings.unknown_saga_patience,
            conflict_retries=settings.conflict_retries,
            failure_attempts=settings.failure_attempts,
            failure_backoff=settings.failure_backoff,
            error_backoff=settings.error_backoff,
        )
        #: What this engine serves, in ``saga_served_definitions`` (engine/served.py).
        self.registration: Registration | None = (
            Registration(
                store,
                self.advancer.serving,
                self.instance_id,
                interval=settings.heartbeat_interval,
            )
            if settings.heartbeat_interval > 0
            else None
        )
        #: Resumes the held sagas this engine serves, and beats the registration.
        self.held = HeldSagaScan(
            store,
            self.advancer,
            clock=clock,
            interval=settings.held_interval,
            batch=settings.held_batch,
            error_backoff=settings.error_backoff,
            registration=self.registration,
        )
        #: Fires due step timeouts and retry backoffs.
        self.timers: TimerScanner = timers or StoreTimerScanner(
            store, self.advancer, batch=settings.timer_batch
        )
        #: True while the reply consumer is attached (the daemon's readiness check).
        self.consuming = False
        #: Holds timeouts while replies may wait unapplied; None while not consuming
        #: (then nothing could apply a reply, and timeouts go by their deadline).
        self.watermark: ReplyWatermark | None = None

    # -- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish what is in flight and return."""
        self._stop.set()

    async def run(self) -> None:
        """Consume replies, fire timers and relay the outbox until :meth:`stop`."""
        try:
            await self._run()
        finally:
            # Cleared only now: a stop() that came before run() got going is kept.
            self._stop.clear()

    async def _run(self) -> None:
        subscription = await self.transport.subscribe(
            self.topology.replies, group=self.topology.group(self.settings.group)
        )
        subscriptions = [subscription]
        self.consuming = True
        letters = None
        if self.settings.archive_dead_letters:
            try:
                letters = await self.transport.subscribe(
                    self.topology.dead_letters,
                    group=self.topology.group(f"{self.settings.group}-dead-letters"),
                )
            except BaseException:
                await subscription.close()
                raise
            subscriptions.append(letters)

        consumer = asyncio.create_task(
            self.consumer.consume(subscription), name="saga-engine-replies"
        )
        self.watermark = ReplyWatermark(
            subscription,
            clock=self.clock,
            interval=self.settings.watermark_interval,
            settle=self.settings.reply_settle,
            hold=self.settings.timeout_hold,
        )
        loops = [
            consumer,
            asyncio.create_task(self.watermark.run(self._stop), name="saga-engine-watermark"),
            asyncio.create_task(self.relay.run(self._stop), name="saga-engine-relay"),
            asyncio.create_task(self._timer_loop(), name="saga-engine-timers"),
            asyncio.create_task(self.deferred.run(self._stop), name="saga-engine-deferred"),
            asyncio.create_task(self.held.run(self._stop), name="saga-engine-held"),
        ]
        if letters is not None:
            archive = self.archive.consume(letters, self._stop, self.settings.error_backoff)
            loops.append(asyncio.create_task(archive, name="saga-engine-dead-letters"))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*loops, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.consuming = False
            self.watermark = None
            self._stop.set()
            # Closing the subscriptions ends the consumers after their current message.
            for sub in subscriptions:
                await sub.close()
            await asyncio.wait(loops, timeout=10)
            for task in loops:
                task.cancel()
            stopper.cancel()

    # -- replies -----------------------------------------------------------------

    @property
    def replies_handled(self) -> int:
        """Reply deliveries acknowledged (applied, duplicate or set aside)."""
        return self.consumer.handled

    async def handle_delivery(self, delivery: Delivery) -> None:
        """Apply one delivery and settle it (see :meth:`ReplyConsumer.handle_deliveries`)."""
        await self.consumer.handle_deliveries([delivery])

    async def handle_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Apply a batch of deliveries, then settle each (ack after the commit)."""
        await self.consumer.handle_deliveries(deliveries)

    async def handle_reply(self, reply: Envelope) -> bool:
        """Apply one reply in one transaction; False if it was a duplicate."""
        return await self.consumer.handle_reply(reply)

    async def apply_replies(
        self, replies: Sequence[Envelope], *, deliveries: Sequence[Message] | None = None
    ) -> list[ReplyResult]:
        """Apply replies in one transaction, in order; what became of each (see
        :meth:`ReplyConsumer.apply_replies`)."""
        return await self.consumer.apply_replies(replies, deliveries=deliveries)

    # -- deferred replies --------------------------------------------------------

    async def retry_deferred_replies(self) -> int:
        """One scan of the deferred replies that are due (see :mod:`engine.deferred`)."""
        return await self.deferred.scan()

    @property
    def deferred_settled(self) -> int:
        """Deferred replies settled: applied, found duplicate, or dead-lettered."""
        return self.deferred.settled

    # -- timers ------------------------------------------------------------------

    async def fire_due_timers(self) -> int:
        """Fire the timers due now (one scan of :attr:`timers`); returns how many fired.

        While replies are consumed, a timeout is due only once the reply watermark
        says no reply for it can wait unapplied, or past the hold bound."""
        now = self.clock()
        watermark = self.watermark
        timeouts_due_by = None if watermark is None else watermark.timeouts_due_by(now)
        fired = await self.timers.fire_due(now, timeouts_due_by=timeouts_due_by)
        self.timers_fired += fired
        return fired

    async def _timer_loop(self) -> None:
        # Through the attribute at each round, so a scan can be observed (tests).
        await scan_timers(
            lambda: self.fire_due_timers(),
            self._stop,
            batch=self.timers.batch,
            interval=self.settings.timer_interval,
            error_backoff=self.settings.error_backoff,
        )
