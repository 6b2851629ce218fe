"""The orchestrator: consumes replies, fires timers, and relays the outbox.

Every change to a saga happens in one store transaction that also records the
reply's message id (inbox) and the messages the change emits (outbox); the broker
delivery is acknowledged only after that transaction committed.
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

from engine._aio import batched, wait_either
from engine.advance import Advancer
from engine.clock import Clock, utc_now
from engine.deadletters import DeadLetterArchive
from engine.deferred import DeferredReplyScan, deferral
from engine.errors import ConcurrencyConflict, DecodeError, SagaError, UnknownSagaError
from engine.faults import crashpoint
from engine.limits import DEFAULT_LIMITS, Limits
from engine.messages import Envelope, MessageKind, decode
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.replies import ReplyOutcome, ReplyResult
from engine.signing import NO_SIGNING, Signing
from engine.store.base import SagaStore
from engine.store.failures import error_text, is_transient
from engine.telemetry.logs import saga_context
from engine.topology import Topology
from engine.transport.base import Delivery, Message, Transport
from engine.watermark import ReplyWatermark

log = logging.getLogger("saga.engine")


class _NotVisible(Exception):
    """The reply's saga row is not (yet) visible to this transaction."""


def _log_duplicate(reply: Envelope) -> None:
    with saga_context(reply.saga_id, reply.step):
        log.info(
            "reply %s of saga %s was applied before: a duplicate, acknowledged",
            reply.message_id,
            reply.saga_id,
        )


@dataclass(frozen=True)
class Failed:
    """A reply transaction that failed: retried, handed back or dead-lettered by the
    error's kind."""

    error: Exception


@dataclass(frozen=True)
class Ack:
    """The reply's transaction committed (or it needed none): done with it."""


@dataclass(frozen=True)
class Nack:
    """Hand the delivery back for redelivery; ``pause`` first when the database is away."""

    pause: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """Move the delivery to the dead-letter destination, saying why."""

    reason: str


#: How a delivery is settled.
Settlement = Ack | Nack | DeadLetter
ACK = Ack()


@dataclass(frozen=True)
class EngineSettings:
    """The engine's tunables: its consumer group, timer scan, batching, patience with
    replies that come early, and the reply watermark. The daemon builds them from the
    ``SAGA_*`` settings; the defaults suit one engine on a small machine."""

    group: str = "saga-engine"
    timer_interval: float = 0.1
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


class Engine:
    """The orchestrator: consumes replies, fires due timers, relays the outbox and
    archives dead letters, advancing each saga through one unit of work (``advance``).

    Any number of engines may share a database and a broker: each saga row has one
    writer at a time, and a reply or timer is applied once whichever engine takes it.
    ``run`` until ``stop``; ``sagactl engine`` runs one with signals and a clean drain."""

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
        self.replies_handled = 0
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

        async def consume() -> None:
            # Replies that arrived while the last batch was being applied are applied
            # together, in one transaction: under load the database sees a few
            # statements per batch instead of a dozen per reply; idle, a batch is one.
            async for batch in batched(subscription, self.settings.reply_batch):
                await self.handle_deliveries(batch)

        consumer = asyncio.create_task(consume(), name="saga-engine-replies")
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

    async def handle_delivery(self, delivery: Delivery) -> None:
        """Apply one delivered reply, as the consumer applies each batch."""
        await self.handle_deliveries([delivery])

    async def handle_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Apply a batch of deliveries, then settle each (ack after the commit).

        Nothing here waits for anything but the database: a reply whose saga is not
        visible is set aside in the same transaction (see :mod:`engine.deferred`).
        """
        decoded: list[tuple[Delivery, Envelope]] = []
        for delivery in deliveries:
            try:
                self.signing.check(delivery.message, "reply")
                envelope = decode(delivery.message.body, self.limits)
                if envelope.kind is not MessageKind.REPLY:
                    raise DecodeError(f"the engine takes replies, not a {envelope.kind}")
            except DecodeError as exc:  # a SignatureError too: refused, never applied
                log.error("dead-lettering a message it cannot take: %s", exc)
                await self._settle(delivery, DeadLetter(str(exc)))
                continue
            decoded.append((delivery, envelope))
        if len(decoded) > 1:
            attempt = await self._attempt(
                [envelope for _, envelope in decoded],
                [delivery.message for delivery, _ in decoded],
            )
            if isinstance(attempt, Failed):
                # A conflict, the database, or one bad reply failed the batch: each on
                # its own now, with the retries and back-off of the single path.
                log.warning(
                    "batch of %d replies failed, applying one by one: %s",
                    len(decoded),
                    error_text(attempt.error),
                )
            else:
                for (delivery, envelope), result in zip(decoded, attempt, strict=True):
                    with saga_context(envelope.saga_id, envelope.step):
                        await self._settle(delivery, self._settlement(envelope, result))
                return
        for delivery, envelope in decoded:
            with saga_context(envelope.saga_id, envelope.step):
                await self._settle(delivery, await self._apply_one(delivery, envelope))

    async def _attempt(
        self, replies: Sequence[Envelope], deliveries: Sequence[Message]
    ) -> list[ReplyResult] | Failed:
        """Apply replies in one transaction: what became of each, or why it failed."""
        try:
            return await self.apply_replies(replies, deliveries=deliveries)
        except Exception as exc:
            return Failed(exc)

    async def _settle(self, delivery: Delivery, settlement: Settlement) -> None:
        """Settle a delivery as decided (an ack only after its reply's commit)."""
        try:
            if isinstance(settlement, DeadLetter):
                await delivery.dead_letter(settlement.reason)
            elif isinstance(settlement, Nack):
                await delivery.nack()
                if settlement.pause:
                    await wait_either(self._stop, None, self.settings.error_backoff)
            else:
                crashpoint("engine.after_commit")
                self.replies_handled += 1
                await delivery.ack()
        except SagaError as exc:
            # e.g. the dead-letter destination refused: the message was handed
            # back to the broker, so pause instead of ending the consumer.
            log.error("delivery not settled, broker will redeliver: %s", exc)
            await wait_either(self._stop, None, self.settings.error_backoff)

    def _settlement(self, envelope: Envelope, result: ReplyResult) -> Settlement:
        """How to settle a delivery whose reply's transaction committed, by its outcome."""
        outcome, reason = result
        if outcome is ReplyOutcome.UNKNOWN:
            log.error("dead-lettering reply for saga %s: %s", envelope.saga_id, reason)
            return DeadLetter(reason or f"no definition of saga {envelope.saga_name}")
        if outcome is ReplyOutcome.DUPLICATE:
            _log_duplicate(envelope)
        elif outcome is ReplyOutcome.DEFERRED:
            log.warning(
                "reply %s: saga %s is not visible (yet); set aside, retried for up to %gs",
                envelope.message_id,
                envelope.saga_id,
                self.settings.unknown_saga_patience,
            )
        return ACK

    async def _apply_one(self, delivery: Delivery, envelope: Envelope) -> Settlement:
        """Apply one reply, retrying conflicts and (a bounded number of times) errors
        that are not transient; how to settle its delivery."""
        conflicts = 0
        failures = 0
        while True:
            attempt = await self._attempt([envelope], [delivery.message])
            if not isinstance(attempt, Failed):
                (result,) = attempt
                return self._settlement(envelope, result)
            exc = attempt.error
            if isinstance(exc, ConcurrencyConflict):
                conflicts += 1
                if conflicts > self.settings.conflict_retries:
                    return Nack()
                continue
            if is_transient(exc):
                # The database is away or busy: everyone's problem, nobody's dead
                # letter. The broker redelivers; back off so it is not a hot loop.
                log.error(
                    "reply %s not applied, will be redelivered: %s",
                    envelope.message_id,
                    error_text(exc),
                )
                return Nack(pause=True)
            failures += 1
            if failures >= self.settings.failure_attempts:
                reason = f"not applied after {failures} attempts: {error_text(exc)}"
                log.error("dead-lettering reply %s: %s", envelope.message_id, reason, exc_info=exc)
                return DeadLetter(reason)
            log.warning(
                "reply %s not applied (try %d of %d): %s",
                envelope.message_id,
                failures,
                self.settings.failure_attempts,
                error_text(exc),
            )
            await wait_either(self._stop, None, self.settings.failure_backoff)

    async def handle_reply(self, reply: Envelope) -> bool:
        """Apply one reply in one transaction; False if it was a duplicate."""
        ((outcome, reason),) = await self.apply_replies([reply])
        if outcome is ReplyOutcome.NOT_VISIBLE:
            raise _NotVisible(reply.saga_id)
        if outcome is ReplyOutcome.UNKNOWN:
            raise UnknownSagaError(reason or f"no definition of saga {reply.saga_name}")
        return outcome is ReplyOutcome.APPLIED

    async def apply_replies(
        self, replies: Sequence[Envelope], *, deliveries: Sequence[Message] | None = None
    ) -> list[ReplyResult]:
        """Apply replies in one transaction, in order; what became of each.

        With ``deliveries`` (the messages the replies came in, in the same order), the
        replies whose saga is not visible are set aside in the same transaction, in
        one statement, and come back DEFERRED: the caller acknowledges them at once.
        """
        async with self.store.transaction() as tx:
            outcomes, changed = await self.advancer.replies(tx, replies)
            if deliveries is not None:
                unseen = [
                    i
                    for i, (outcome, _) in enumerate(outcomes)
                    if outcome is ReplyOutcome.NOT_VISIBLE
                ]
                now = self.clock()
                await tx.defer_replies([deferral(deliveries[i], replies[i], now) for i in unseen])
                for i in unseen:
                    outcomes[i] = ReplyResult(ReplyOutcome.DEFERRED)
        self.advancer.committed(changed)
        if any(outcome is ReplyOutcome.DEFERRED for outcome, _ in outcomes):
            self.deferred.wake.set()
        return outcomes

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
        """Fire the timers due now, in one transaction; returns how many fired.

        While replies are consumed, a timeout is due only once the reply watermark
        says no reply for it can wait unapplied, or past the hold bound."""
        now = self.clock()
        watermark = self.watermark
        timeouts_due_by = None if watermark is None else watermark.timeouts_due_by(now)
        async with self.store.transaction() as tx:
            fired, changed = await self.advancer.timers(
                tx, now, self.settings.timer_batch, timeouts_due_by=timeouts_due_by
            )
        self.advancer.committed(changed)
        self.timers_fired += fired
        return fired

    async def _timer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                fired = await self.fire_due_timers()
            except ConcurrencyConflict:
                continue  # a reply won the race; the timer is re-read next round
            except Exception as exc:
                log.error("timer scan failed, retrying: %s", exc)
                await wait_either(self._stop, None, self.settings.error_backoff)
                continue
            if fired < self.settings.timer_batch:
                await wait_either(self._stop, None, self.settings.timer_interval)
