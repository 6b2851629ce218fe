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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine._aio import batched, wait_either
from engine.clock import Clock, utc_now
from engine.database import error_text, is_transient
from engine.deadletters import DeadLetterArchive
from engine.deferred import DeferredReplyScan, deferral
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, DecodeError, SagaError, UnknownSagaError
from engine.faults import crashpoint
from engine.limits import ANY_SIZE, DEFAULT_LIMITS, Limits
from engine.messages import Envelope, MessageKind, decode
from engine.model import TIMEOUTS, HistoryEntry, SagaState
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay, Undeliverable
from engine.replies import Change, ReplyOutcome, ReplyResult
from engine.signing import NO_SIGNING, Signing
from engine.statemachine import Transition
from engine.store.base import SagaStore, StoreTransaction, write_transition, write_transitions
from engine.telemetry import metrics
from engine.telemetry.logs import saga_context
from engine.telemetry.tracing import process_span, saga_span, trace_transition
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
class EngineSettings:
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
        if self.relay.on_undeliverable is None:
            self.relay.on_undeliverable = self.apply_undeliverable
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
        #: Sagas whose due timers this engine skipped for want of their definition.
        self._foreign: set[str] = set()
        self.timers_fired = 0
        settings = self.settings
        self.deferred = DeferredReplyScan(
            store,
            self._apply,
            self._committed,
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
        #: ``messaging.system`` trace attribute of the transport.
        self.messaging_system = messaging_system
        #: Replies over them are dead-lettered; built commands over them fail the step.
        self.limits = limits

    # -- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
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
                await self._settle(delivery.dead_letter(str(exc)))
                continue
            decoded.append((delivery, envelope))
        if len(decoded) > 1:
            try:
                outcomes = await self.apply_replies(
                    [envelope for _, envelope in decoded],
                    deliveries=[delivery.message for delivery, _ in decoded],
                )
            except Exception as exc:
                # A conflict, the database, or one bad reply failed the batch: each on
                # its own now, with the retries and back-off of the single path.
                log.warning(
                    "batch of %d replies failed, applying one by one: %s",
                    len(decoded),
                    error_text(exc),
                )
            else:
                for (delivery, envelope), result in zip(decoded, outcomes, strict=True):
                    with saga_context(envelope.saga_id, envelope.step):
                        await self._settle(self._settle_reply(delivery, envelope, result))
                return
        for delivery, envelope in decoded:
            await self._apply_delivery(delivery, envelope)

    async def _settle(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except SagaError as exc:
            # e.g. the dead-letter destination refused: the message was handed
            # back to the broker, so pause instead of ending the consumer.
            log.error("delivery not settled, broker will redeliver: %s", exc)
            await wait_either(self._stop, None, self.settings.error_backoff)

    async def _acknowledge(self, delivery: Delivery) -> None:
        crashpoint("engine.after_commit")
        self.replies_handled += 1
        await delivery.ack()

    async def _settle_reply(
        self, delivery: Delivery, envelope: Envelope, result: ReplyResult
    ) -> None:
        """Settle a delivery whose reply's transaction committed, by its outcome."""
        outcome, reason = result
        if outcome is ReplyOutcome.UNKNOWN:
            log.error("dead-lettering reply for saga %s: %s", envelope.saga_id, reason)
            await delivery.dead_letter(reason or f"no definition of saga {envelope.saga_name}")
            return
        if outcome is ReplyOutcome.DUPLICATE:
            _log_duplicate(envelope)
        elif outcome is ReplyOutcome.DEFERRED:
            log.warning(
                "reply %s: saga %s is not visible (yet); set aside, retried for up to %gs",
                envelope.message_id,
                envelope.saga_id,
                self.settings.unknown_saga_patience,
            )
        await self._acknowledge(delivery)

    async def _apply_delivery(self, delivery: Delivery, envelope: Envelope) -> None:
        """Apply one reply, retrying conflicts and (a bounded number of times) errors
        that are not transient."""
        with saga_context(envelope.saga_id, envelope.step):
            await self._settle(self._apply_one(delivery, envelope))

    async def _apply_one(self, delivery: Delivery, envelope: Envelope) -> None:
        conflicts = 0
        failures = 0
        while True:
            try:
                (result,) = await self.apply_replies([envelope], deliveries=[delivery.message])
                break
            except ConcurrencyConflict:
                conflicts += 1
                if conflicts > self.settings.conflict_retries:
                    await delivery.nack()
                    return
            except Exception as exc:
                if is_transient(exc):
                    # The database is away or busy: everyone's problem, nobody's dead
                    # letter. The broker redelivers; back off so it is not a hot loop.
                    log.error(
                        "reply %s not applied, will be redelivered: %s",
                        envelope.message_id,
                        error_text(exc),
                    )
                    await delivery.nack()
                    await wait_either(self._stop, None, self.settings.error_backoff)
                    return
                failures += 1
                if failures >= self.settings.failure_attempts:
                    reason = f"not applied after {failures} attempts: {error_text(exc)}"
                    log.error(
                        "dead-lettering reply %s: %s", envelope.message_id, reason, exc_info=exc
                    )
                    await delivery.dead_letter(reason)
                    return
                log.warning(
                    "reply %s not applied (try %d of %d): %s",
                    envelope.message_id,
                    failures,
                    self.settings.failure_attempts,
                    error_text(exc),
                )
                await wait_either(self._stop, None, self.settings.failure_backoff)
        await self._settle_reply(delivery, envelope, result)

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
            outcomes, changed = await self._apply(tx, replies)
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
        self._committed(changed)
        if any(outcome is ReplyOutcome.DEFERRED for outcome, _ in outcomes):
            self.deferred.wake.set()
        return outcomes

    async def _apply(
        self, tx: StoreTransaction, replies: Sequence[Envelope]
    ) -> tuple[list[ReplyResult], list[Change]]:
        """Apply replies inside ``tx``; their outcomes and the sagas they changed.

        The sagas are locked first (in id order), then the message ids claimed in the
        inbox: every engine takes the two in that order, so replicas cannot deadlock.
        """
        outcomes = [ReplyResult(ReplyOutcome.NOT_VISIBLE)] * len(replies)
        changed: dict[str, Change] = {}
        states = await tx.lock_sagas(r.saga_id for r in replies)
        definitions: dict[str, Saga] = {}
        candidates: list[int] = []
        for i, reply in enumerate(replies):
            state = states.get(reply.saga_id)
            if state is None:
                continue
            try:
                definitions[state.id] = self.registry.get(state.name, state.version)
            except UnknownSagaError as exc:
                outcomes[i] = ReplyResult(ReplyOutcome.UNKNOWN, str(exc))
                continue
            candidates.append(i)
        claimed = await tx.claim_inboxes(
            {replies[i].message_id: replies[i].saga_id for i in candidates},
            self.settings.group,
        )
        now = self.clock()
        for i in candidates:
            reply = replies[i]
            if reply.message_id not in claimed:
                outcomes[i] = ReplyResult(ReplyOutcome.DUPLICATE)
                continue
            claimed.discard(reply.message_id)  # a second copy in this batch: duplicate
            state = states[reply.saga_id]
            with (
                saga_context(reply.saga_id, reply.step),
                process_span(
                    reply,
                    system=self.messaging_system,
                    destination=self.topology.replies,
                    group=self.settings.group,
                ),
            ):
                transition = Transition(
                    definitions[state.id],
                    state,
                    now=now,
                    topology=self.topology,
                    rng=self.rng,
                    limits=self.limits,
                )
                transition.on_reply(reply)
                messages = trace_transition(
                    state, transition.messages, transition.history, system=self.messaging_system
                )
            _, emitted, entries = changed.setdefault(state.id, (state, [], []))
            emitted.extend(messages)
            entries.extend(transition.history)
            outcomes[i] = ReplyResult(ReplyOutcome.APPLIED)
        await write_transitions(tx, list(changed.values()))
        return outcomes, list(changed.values())

    def _committed(self, changed: Sequence[Change]) -> None:
        """After the commit of applied replies: metrics, and the relay for their output."""
        for state, _, entries in changed:
            metrics.record_transition(state, entries)
        if any(emitted for _, emitted, _ in changed):
            self.relay.wake()

    # -- deferred replies --------------------------------------------------------

    async def retry_deferred_replies(self) -> int:
        """One scan of the deferred replies that are due (see :mod:`engine.deferred`)."""
        return await self.deferred.scan()

    @property
    def deferred_settled(self) -> int:
        """Deferred replies settled: applied, found duplicate, or dead-lettered."""
        return self.deferred.settled

    # -- messages the broker refused ---------------------------------------------

    async def apply_undeliverable(
        self, tx: StoreTransaction, refused: Sequence[Undeliverable]
    ) -> Callable[[], None] | None:
        """Advance the sagas of outbox rows the broker refused for good, in the relay's
        transaction (:meth:`Transition.on_undeliverable`); what to do once it committed.

        The relay holds those rows' locks; it locks the sagas now, in id order, as the
        reply path does. Nothing that holds a saga's lock waits for an outbox row's
        (replies and timers only insert new rows), so the two cannot deadlock.
        """
        found: list[tuple[Envelope, str]] = []
        for item in refused:
            try:
                found.append((decode(item.record.body, ANY_SIZE), item.reason))
            except DecodeError:
                continue  # not one of ours (a replayed dead letter): archived only
        states = await tx.lock_sagas(envelope.saga_id for envelope, _ in found)
        changed: dict[str, Change] = {}
        now = self.clock()
        for envelope, reason in found:
            state = states.get(envelope.saga_id)
            if state is None:
                continue
            try:
                definition = self.registry.get(state.name, state.version)
            except UnknownSagaError as exc:
                log.warning("refused message of saga %s not applied: %s", state.id, exc)
                continue
            with (
                saga_context(state.id, envelope.step),
                saga_span("saga message undeliverable", state) as span,
            ):
                span.set_attribute("saga.step", envelope.step)
                transition = Transition(
                    definition,
                    state,
                    now=now,
                    topology=self.topology,
                    rng=self.rng,
                    limits=self.limits,
                )
                transition.on_undeliverable(envelope, reason)
                messages = trace_transition(
                    state, transition.messages, transition.history, system=self.messaging_system
                )
            _, emitted, entries = changed.setdefault(state.id, (state, [], []))
            emitted.extend(messages)
            entries.extend(transition.history)
        await write_transitions(tx, list(changed.values()))

        def committed() -> None:
            for state, _, entries in changed.values():
                metrics.record_transition(state, entries)

        return committed

    # -- timers ------------------------------------------------------------------

    async def fire_due_timers(self) -> int:
        """Fire the timers due now, in one transaction; returns how many fired.

        While replies are consumed, a timeout is due only once the reply watermark
        says no reply for it can wait unapplied, or past the hold bound."""
        fired = 0
        emitted = False
        done: list[tuple[SagaState, list[HistoryEntry]]] = []
        now = self.clock()
        watermark = self.watermark
        timeouts_due_by = None if watermark is None else watermark.timeouts_due_by(now)
        async with self.store.transaction() as tx:
            due_timers = await tx.due_timers(
                now, self.settings.timer_batch, timeouts_due_by=timeouts_due_by
            )
            for due in due_timers:
                state = await tx.load_saga(due.saga_id)
                if state is None:
                    continue
                try:
                    definition = self.registry.get(state.name, state.version)
                except UnknownSagaError as exc:
                    # Not ours to advance (another replica or deployment has the
                    # definition); failing the whole batch would stall every timer.
                    if state.id not in self._foreign:
                        self._foreign.add(state.id)
                        log.warning("leaving timer of saga %s alone: %s", state.id, exc)
                    continue
                transition = Transition(
                    definition,
                    state,
                    now=self.clock(),
                    topology=self.topology,
                    rng=self.rng,
                    limits=self.limits,
                )
                with (
                    saga_context(state.id, due.timer.step),
                    saga_span(f"saga timer {due.timer.kind.value}", state) as span,
                ):
                    span.set_attribute("saga.step", due.timer.step)
                    late = due.timer.kind in TIMEOUTS and await self._published_late(
                        tx, state.id, definition.step(due.timer.step).timeout
                    )
                    if late:
                        transition.postpone(due.timer, None if late is True else late)
                    elif transition.on_timer(due.timer):
                        fired += 1
                    messages = trace_transition(
                        state,
                        transition.messages,
                        transition.history,
                        system=self.messaging_system,
                    )
                    await write_transition(tx, state, messages, transition.history)
                done.append((state, transition.history))
                emitted = emitted or bool(transition.messages)
        for state, history in done:
            metrics.record_transition(state, history)
        if emitted:
            self.relay.wake()
        self.timers_fired += fired
        return fired

    async def _published_late(
        self, tx: StoreTransaction, saga_id: str, timeout: timedelta
    ) -> datetime | bool:
        """True if the message a timeout times is still unsent; when it went out, if
        that was less than its timeout ago (the deadline was set when the step was
        written, and an engine or broker that was down relayed it only then); else
        False."""
        if await tx.has_unsent(saga_id):
            return True
        sent = await tx.last_sent(saga_id)
        if sent is not None and sent + timeout > self.clock():
            return sent
        return False

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
