"""The orchestrator: consumes replies, fires timers, and relays the outbox.

Every change to a saga happens in one store transaction that also records the
reply's message id (inbox) and the messages the change emits (outbox); the broker
delivery is acknowledged only after that transaction committed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from engine._aio import batched, wait_either
from engine.clock import Clock, utc_now
from engine.deadletters import DeadLetterArchive
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, DecodeError, SagaError, UnknownSagaError
from engine.faults import crashpoint
from engine.messages import Envelope, MessageKind, decode
from engine.model import TIMEOUTS, HistoryEntry, OutboxMessage, SagaState
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.statemachine import Transition
from engine.store.base import (
    SagaStore,
    StoreTransaction,
    write_transition,
    write_transitions,
)
from engine.telemetry import metrics
from engine.telemetry.logs import saga_context
from engine.telemetry.tracing import process_span, saga_span, trace_transition
from engine.topology import Topology
from engine.transport.base import Delivery, Transport
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


class ReplyOutcome(enum.Enum):
    APPLIED = "applied"
    #: Its message id was processed before: acknowledged, nothing changes.
    DUPLICATE = "duplicate"
    #: No saga row (yet): another engine's start may not have committed.
    NOT_VISIBLE = "not visible"
    #: The saga exists but this engine has no definition of its name and version.
    UNKNOWN = "unknown definition"


class ReplyResult(NamedTuple):
    outcome: ReplyOutcome
    #: Why, for UNKNOWN: the registry's error, which names what is missing.
    reason: str | None = None


@dataclass(frozen=True)
class EngineSettings:
    group: str = "saga-engine"
    timer_interval: float = 0.1
    timer_batch: int = 100
    #: Most replies applied in one transaction.
    reply_batch: int = 100
    #: How long a reply for an unknown saga is retried before it is dead-lettered.
    unknown_saga_patience: float = 10.0
    conflict_retries: int = 20
    #: Pause after an unexpected error (e.g. the database is down) before going on.
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
    ) -> None:
        self.store = store
        self.transport = transport
        self.registry = registry
        self.topology = topology or Topology()
        self.clock = clock
        self.settings = settings or EngineSettings()
        self.relay = relay or OutboxRelay(store, transport, clock=clock)
        self.archive = DeadLetterArchive(store, clock=clock)
        self.rng = rng or random.Random()
        self.instance_id = instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self.replies_handled = 0
        #: Sagas whose due timers this engine skipped for want of their definition.
        self._foreign: set[str] = set()
        self.timers_fired = 0
        #: True while the reply consumer is attached (the daemon's readiness check).
        self.consuming = False
        #: Holds timeouts while replies may wait unapplied; None while not consuming
        #: (then nothing could apply a reply, and timeouts go by their deadline).
        self.watermark: ReplyWatermark | None = None
        #: ``messaging.system`` trace attribute of the transport.
        self.messaging_system = messaging_system

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
        """Apply a batch of deliveries, then settle each (ack after the commit)."""
        decoded: list[tuple[Delivery, Envelope]] = []
        for delivery in deliveries:
            try:
                envelope = decode(delivery.message.body)
                if envelope.kind is not MessageKind.REPLY:
                    raise DecodeError(f"the engine takes replies, not a {envelope.kind}")
            except DecodeError as exc:
                log.error("dead-lettering undecodable message: %s", exc)
                await self._settle(delivery.dead_letter(str(exc)))
                continue
            decoded.append((delivery, envelope))
        if len(decoded) > 1:
            try:
                outcomes = await self.apply_replies([envelope for _, envelope in decoded])
            except Exception as exc:
                # A conflict, the database, or one bad reply failed the batch: each on
                # its own now, with the retries and back-off of the single path.
                log.warning(
                    "batch of %d replies failed, applying one by one: %s", len(decoded), exc
                )
            else:
                for (delivery, envelope), (outcome, _) in zip(decoded, outcomes, strict=True):
                    if outcome is ReplyOutcome.DUPLICATE:
                        _log_duplicate(envelope)
                    if outcome in (ReplyOutcome.APPLIED, ReplyOutcome.DUPLICATE):
                        await self._acknowledge(delivery)
                    else:  # not visible yet, or no definition: the single path decides
                        await self._apply_delivery(delivery, envelope)
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
        await self._settle(delivery.ack())

    async def _apply_delivery(self, delivery: Delivery, envelope: Envelope) -> None:
        """Apply one reply, retrying conflicts and a saga row not yet visible."""
        with saga_context(envelope.saga_id, envelope.step):
            await self._settle(self._apply_one(delivery, envelope))

    async def _apply_one(self, delivery: Delivery, envelope: Envelope) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.unknown_saga_patience
        conflicts = 0
        delay = 0.01
        while True:
            try:
                if not await self.handle_reply(envelope):
                    _log_duplicate(envelope)
                break
            except ConcurrencyConflict:
                conflicts += 1
                if conflicts > self.settings.conflict_retries:
                    await delivery.nack()
                    return
            except _NotVisible:
                if loop.time() >= deadline:
                    patience = self.settings.unknown_saga_patience
                    reason = f"no saga {envelope.saga_id} after {patience:g}s"
                    log.error("dead-lettering reply: %s", reason)
                    await delivery.dead_letter(reason)
                    return
                if delay == 0.01:
                    log.warning(
                        "reply %s: saga %s is not visible (yet); retrying for up to %gs",
                        envelope.message_id,
                        envelope.saga_id,
                        self.settings.unknown_saga_patience,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except UnknownSagaError as exc:
                log.error("dead-lettering reply for saga %s: %s", envelope.saga_id, exc)
                await delivery.dead_letter(str(exc))
                return
            except Exception:
                # The database (or a bug) failed us: let the broker redeliver, and
                # back off so a database outage is not a hot loop.
                log.exception("reply %s not applied, will be redelivered", envelope.message_id)
                await delivery.nack()
                await wait_either(self._stop, None, self.settings.error_backoff)
                return
        crashpoint("engine.after_commit")
        self.replies_handled += 1
        await delivery.ack()

    async def handle_reply(self, reply: Envelope) -> bool:
        """Apply one reply in one transaction; False if it was a duplicate."""
        ((outcome, reason),) = await self.apply_replies([reply])
        if outcome is ReplyOutcome.NOT_VISIBLE:
            raise _NotVisible(reply.saga_id)
        if outcome is ReplyOutcome.UNKNOWN:
            raise UnknownSagaError(reason or f"no definition of saga {reply.saga_name}")
        return outcome is ReplyOutcome.APPLIED

    async def apply_replies(self, replies: Sequence[Envelope]) -> list[ReplyResult]:
        """Apply replies in one transaction, in order; what became of each.

        The sagas are locked first (in id order), then the message ids claimed in the
        inbox: every engine takes the two in that order, so replicas cannot deadlock.
        """
        outcomes = [ReplyResult(ReplyOutcome.NOT_VISIBLE)] * len(replies)
        changed: dict[str, tuple[SagaState, list[OutboxMessage], list[HistoryEntry]]] = {}
        async with self.store.transaction() as tx:
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
                        definitions[state.id], state, now=now, topology=self.topology, rng=self.rng
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
        for state, _, entries in changed.values():
            metrics.record_transition(state, entries)
        if any(emitted for _, emitted, _ in changed.values()):
            self.relay.wake()
        return outcomes

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
                    definition, state, now=self.clock(), topology=self.topology, rng=self.rng
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
