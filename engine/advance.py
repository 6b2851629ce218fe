"""Advancing sagas: the one unit of work every event goes through.

A start, a reply, a due timer, an operator's retry or cancel, a message the broker
refused for good: each is an :class:`Event` applied to a saga in the same steps, here
and nowhere else. In the caller's transaction the saga is loaded (or locked), the
event decided by a :class:`~engine.statemachine.Transition` (pure), traced, and the saga
written with the messages and history the change adds; once the transaction committed
the change is counted in the metrics and the relay woken. A new kind of event is a new
:class:`Event` and a method that finds the sagas it concerns, not a new copy of these
steps.

Batches stay batches: the replies (timers, refused messages) of one transaction are
locked together and written together, in a few statements whatever their number.
"""

from __future__ import annotations

import asyncio
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from opentelemetry.trace import Span, SpanKind

from engine.clock import Clock, utc_now
from engine.deferred import internal
from engine.definition import Saga, Step
from engine.errors import DecodeError, LimitError, SagaNotFoundError, UnknownSagaError
from engine.limits import ANY_SIZE, DEFAULT_LIMITS, Limits, MessageTooLarge
from engine.messages import Envelope, MessageKind, decode, encode
from engine.model import TIMEOUTS, HistoryEntry, OutboxMessage, SagaState, Timer, TimerKind
from engine.registry import SagaRegistry
from engine.relay import Undeliverable
from engine.replies import Change, ReplyOutcome, ReplyResult
from engine.served import Serving
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus
from engine.store.base import (
    KeptReply,
    OutboxSignal,
    SagaStore,
    StoreTransaction,
    write_transition,
    write_transitions,
)
from engine.telemetry import metrics
from engine.telemetry.logs import saga_context
from engine.telemetry.tracing import process_span, saga_span, trace_transition, tracer
from engine.topology import Topology

log = logging.getLogger("saga.engine")

R_co = TypeVar("R_co", covariant=True)


class Event(Protocol[R_co]):
    """Something that happens to one saga: how it changes the saga, in which span."""

    @property
    def step(self) -> str | None:
        """The step it concerns, for the log context."""
        ...

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        """The span the change is traced in: its messages' ``send`` spans are children."""
        ...

    def apply(self, transition: Transition) -> R_co:
        """Decide: change the transition's saga (pure), and say what was done."""
        ...


@contextmanager
def _saga_span(name: str, state: SagaState, key: str, value: str) -> Iterator[Span]:
    """A span continuing the saga's trace, with one attribute of the event."""
    with saga_span(name, state) as span:
        span.set_attribute(key, value)
        yield span


@dataclass(frozen=True)
class Started:
    """A saga begins: its first step is dispatched. Applied: why its first command was
    refused (over the limits), if it was."""

    step: str | None = None

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        # The saga's trace starts here (or inside the caller's span, if it has one).
        return tracer().start_as_current_span(
            f"saga start {state.name}",
            kind=SpanKind.PRODUCER,
            attributes={"saga.id": state.id, "saga.name": state.name},
        )

    def apply(self, transition: Transition) -> LimitError | None:
        transition.start()
        return transition.refused


@dataclass(frozen=True)
class ReplyReceived:
    """A participant's reply; applied: False if the saga was not waiting for it."""

    reply: Envelope
    system: str
    destination: str
    group: str

    @property
    def step(self) -> str | None:
        return self.reply.step

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        return process_span(
            self.reply, system=self.system, destination=self.destination, group=self.group
        )

    def apply(self, transition: Transition) -> bool:
        return transition.on_reply(self.reply)


@dataclass(frozen=True)
class ChildRequested:
    """A parent saga's request that this child saga undo itself; applied: False if
    stale."""

    request: Envelope

    @property
    def step(self) -> str | None:
        return None

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        return _saga_span("saga compensation requested", state, "saga.parent", self.request.step)

    def apply(self, transition: Transition) -> bool:
        return transition.on_child_request(self.request)


@dataclass(frozen=True)
class TimerDue:
    """A due timer; ``late`` says whether the message a timeout times went out too late
    (True: not yet; a time: only then) to count, so it is postponed instead. Applied:
    True if it fired."""

    timer: Timer
    late: datetime | bool = False
    #: Why no reply may have come, as far as the relay knows (a step timeout's error).
    cause: str | None = None

    @property
    def step(self) -> str | None:
        return self.timer.step

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        return _saga_span(
            f"saga timer {self.timer.kind.value}", state, "saga.step", self.timer.step
        )

    def apply(self, transition: Transition) -> bool:
        if self.late:
            transition.postpone(self.timer, None if self.late is True else self.late)
            return False
        return transition.on_timer(self.timer, self.cause)


@dataclass(frozen=True)
class Undelivered:
    """One of the saga's messages the broker refused for good."""

    message: Envelope
    reason: str

    @property
    def step(self) -> str | None:
        return self.message.step

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        return _saga_span("saga message undeliverable", state, "saga.step", self.message.step)

    def apply(self, transition: Transition) -> bool:
        return transition.on_undeliverable(self.message, self.reason)


@dataclass(frozen=True)
class OperatorAction(ABC):
    """An operator's action on a saga (see :class:`Retried`, :class:`Cancelled`);
    applied: what was done, in words. Refused (:class:`OperationRefused`) where it
    means nothing."""

    #: Its name in spans and messages: "retry", "cancel".
    action: ClassVar[str] = ""
    actor: str
    reason: str | None = None
    step: str | None = None

    def span(self, state: SagaState) -> AbstractContextManager[object]:
        return _saga_span(f"saga {self.action}", state, "saga.operator", self.actor)

    @abstractmethod
    def apply(self, transition: Transition) -> str: ...


@dataclass(frozen=True)
class Retried(OperatorAction):
    """Resume a parked saga, or end a retry backoff now."""

    action: ClassVar[str] = "retry"

    def apply(self, transition: Transition) -> str:
        return transition.operator_retry(self.actor, self.reason)


@dataclass(frozen=True)
class Cancelled(OperatorAction):
    """Stop a running saga and compensate what ran."""

    action: ClassVar[str] = "cancel"

    def apply(self, transition: Transition) -> str:
        return transition.cancel(self.actor, self.reason)


@dataclass(frozen=True)
class Signalled(OperatorAction):
    """The application's named event for a saga: it completes the wait step waiting
    for it (:class:`~engine.definition.WaitFor`), or is kept until the saga gets
    there. ``step`` is filled by nothing: the event's name chooses the step."""

    action: ClassVar[str] = "signal"
    event: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, transition: Transition) -> str:
        return transition.on_signal(self.event, self.payload, self.actor)


class Operated(NamedTuple):
    """What an operator action did to its saga."""

    state: SagaState
    previous: SagaStatus
    summary: str
    messages: list[OutboxMessage]


class _Changes(dict[str, Change]):
    """The changes of one transaction, by saga id; with the sagas they create (child
    sagas) and the messages between children and parents they send."""

    def __init__(self) -> None:
        super().__init__()
        self.new: set[str] = set()
        self.notices: list[Envelope] = []


R = TypeVar("R")


class Advancer:
    """Advances sagas: the one place an event becomes a transition, and a transition
    a traced change written with its outbox messages and history, counted and relayed.

    Every event source calls it: :meth:`start` and :meth:`operate` (the client) in
    transactions of their own; :meth:`replies`, :meth:`timers` and
    :meth:`undeliverable` (the engine, the deferred-reply scan, the relay) in the
    caller's transaction, after which the caller calls :meth:`committed`.
    """

    def __init__(
        self,
        registry: SagaRegistry,
        *,
        topology: Topology | None = None,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        limits: Limits = DEFAULT_LIMITS,
        messaging_system: str = "memory",
        group: str = "saga-engine",
        wake: Callable[[], None] | None = None,
        signal: OutboxSignal | None = None,
    ) -> None:
        self.registry = registry
        self.topology = topology or Topology()
        self.clock = clock
        #: Jitter of retry delays; seeded in tests.
        self.rng = rng or random.Random()
        #: Commands and compensations over them are not emitted (see Transition).
        self.limits = limits
        #: ``messaging.system`` trace attribute of the transport the relay publishes to.
        self.messaging_system = messaging_system
        #: The consumer group replies are claimed under (inbox) and traced with.
        self.group = group
        #: Called after a commit that added outbox rows (the relay of this process).
        self.wake = wake
        #: Wakes relays in other processes (PostgreSQL: NOTIFY) on such a commit.
        self.signal = signal
        #: What the relay knows of a destination nobody reads (OutboxRelay.unserved),
        #: added to the error of a step that timed out; None: nothing known.
        self.unserved: Callable[[str], str | None] | None = None
        #: Wakes the deferred-reply scan, which applies messages between child and
        #: parent sagas (set by the engine); without it the scan finds them by polling.
        self.wake_deferred: Callable[[], None] | None = None
        self._noticed = False
        #: What this engine serves, and the other live engines (engine/served.py).
        self.serving = Serving(registry)
        #: Set once replies were kept for sagas this engine serves (they are held):
        #: the held-saga scan resumes them at once (engine/held.py).
        self.kept = asyncio.Event()
        self._kept_for_us = False
        #: Sagas left to another engine that serves them (said once each).
        self._foreign: set[str] = set()

    # -- the unit: decide, trace, write, then count and wake ---------------------

    def _decide(
        self, definition: Saga, state: SagaState, event: Event[R], now: datetime
    ) -> tuple[Transition, R]:
        """The pure transition: the one place one is made."""
        transition = Transition(
            definition, state, now=now, topology=self.topology, rng=self.rng, limits=self.limits
        )
        return transition, event.apply(transition)

    def _record(self, changes: _Changes, transition: Transition) -> None:
        """Trace the transition's messages in the current span; add it to ``changes``."""
        state = transition.state
        messages = trace_transition(
            state, transition.messages, transition.history, system=self.messaging_system
        )
        _, emitted, entries = changes.setdefault(state.id, (state, [], []))
        emitted.extend(messages)
        entries.extend(transition.history)
        changes.notices.extend(transition.notices)
        for definition, child in transition.spawned:
            changes.new.add(child.id)
            start, _ = self._decide(definition, child, Started(), transition.now)
            self._record(changes, start)

    def _advance(
        self, changes: _Changes, definition: Saga, state: SagaState, event: Event[R], now: datetime
    ) -> R:
        """Apply an event to a saga inside its span, adding the change to ``changes``.

        (A start or an operator's action is decided before its span opens instead: the
        state machine may refuse it, and a refused one leaves no span.)"""
        with saga_context(state.id, event.step), event.span(state):
            transition, result = self._decide(definition, state, event, now)
            self._record(changes, transition)
        return result

    async def _write(self, tx: StoreTransaction, changes: _Changes) -> None:
        """Write the changed sagas with their messages and history, a few statements
        for any number, and the sagas they start; announce the messages to other
        processes' relays. Messages between child and parent sagas are set aside as
        deferred replies: the engine's deferred-reply scan applies them (no broker)."""
        for saga_id in sorted(changes.new):
            state, messages, entries = changes[saga_id]
            await write_transition(tx, state, messages, entries, new=True)
        await write_transitions(tx, [c for c in changes.values() if c[0].id not in changes.new])
        if changes.notices:
            now = self.clock()
            await tx.defer_replies([internal(notice, now) for notice in changes.notices])
            self._noticed = True
        if self.signal is not None and _emitted(changes.values()):
            await self.signal.announce(tx)

    def committed(self, changed: Iterable[Change]) -> None:
        """After the commit of changes: the metrics, and the relay for their messages."""
        changed = list(changed)
        if self._kept_for_us:
            self._kept_for_us = False
            self.kept.set()
        for state, _, entries in changed:
            metrics.record_transition(state, entries)
        if self.wake is not None and _emitted(changed):
            self.wake()
        if self._noticed and self.wake_deferred is not None:
            self._noticed = False
            self.wake_deferred()

    # -- event sources -------------------------------------------------------------

    async def start(
        self, store: SagaStore, definition: Saga, saga_id: str, data: Mapping[str, Any]
    ) -> SagaState:
        """Create a saga and dispatch its first step, in a transaction of its own.

        Refused before anything is stored: a first command over the limits."""
        now = self.clock()
        state = new_saga(definition, saga_id, data, now)
        event = Started()
        transition, refused = self._decide(definition, state, event, now)
        if isinstance(refused, MessageTooLarge):
            raise LimitError(
                f"input too large: the first command would be {refused.size:,} bytes, "
                f"the limit is {refused.limit:,} (SAGA_MAX_MESSAGE_BYTES)"
            )
        if refused is not None:
            raise LimitError(f"input refused: the first command: {refused}")
        changes = _Changes()
        with event.span(state):
            self._record(changes, transition)
            changes.new.add(state.id)
            async with store.transaction() as tx:  # SagaIdTaken if the id is taken
                await self._write(tx, changes)
        self.committed(changes.values())
        return state

    async def operate(self, store: SagaStore, saga_id: str, event: OperatorAction) -> Operated:
        """Apply an operator's action in a transaction of its own, under the saga's
        optimistic row version: ConcurrencyConflict if the engine advanced it first."""
        changes = _Changes()
        async with store.transaction() as tx:
            state = await tx.load_saga(saga_id)
            if state is None:
                raise SagaNotFoundError(f"no saga with id {saga_id!r}")
            try:
                definition = self.registry.get(state.name, state.version)
            except UnknownSagaError as exc:
                raise UnknownSagaError(
                    f"cannot {event.action} saga {saga_id}: {exc}; load its module with "
                    "--sagas or SAGA_SAGAS"
                ) from None
            if self.serving.definition(state) is None:
                raise UnknownSagaError(
                    f"cannot {event.action} saga {saga_id}: {self.serving.why_not(state)}; "
                    "load the definition it started with"
                )
            previous = state.status
            transition, summary = self._decide(definition, state, event, self.clock())
            with event.span(state):
                self._record(changes, transition)
                await self._write(tx, changes)
        self.committed(changes.values())
        return Operated(state, previous, summary, changes[state.id][1])

    async def replies(
        self, tx: StoreTransaction, replies: Sequence[Envelope]
    ) -> tuple[list[ReplyResult], list[Change]]:
        """Apply replies inside ``tx``, in order; what became of each, and the sagas
        they changed.

        The sagas are locked first (in id order), then the message ids claimed in the
        inbox: every engine takes the two in that order, so replicas cannot deadlock.
        """
        outcomes = [ReplyResult(ReplyOutcome.NOT_VISIBLE)] * len(replies)
        states = await tx.lock_sagas(r.saga_id for r in replies)
        definitions: dict[str, Saga] = {}
        candidates: list[int] = []
        holds: dict[str, str] = {}
        kept: list[Envelope] = []
        for i, reply in enumerate(replies):
            state = states.get(reply.saga_id)
            if state is None:
                continue
            definition = self._definition(state, holds)
            if definition is None:
                kept.append(reply)
                why = holds.get(state.id) or state.held or "left to an engine that serves it"
                outcomes[i] = ReplyResult(ReplyOutcome.HELD, why)
                continue
            definitions[state.id] = definition
            candidates.append(i)
        await self._hold(tx, holds, kept, states)
        claimed = await tx.claim_inboxes(
            {replies[i].message_id: replies[i].saga_id for i in candidates}, self.group
        )
        changes = _Changes()
        now = self.clock()
        for i in candidates:
            reply = replies[i]
            if reply.message_id not in claimed:
                outcomes[i] = ReplyResult(ReplyOutcome.DUPLICATE)
                continue
            claimed.discard(reply.message_id)  # a second copy in this batch: duplicate
            state = states[reply.saga_id]
            event: Event[bool] = (
                ChildRequested(reply)
                if reply.kind is MessageKind.COMPENSATION
                else ReplyReceived(reply, self.messaging_system, self.topology.replies, self.group)
            )
            self._advance(changes, definitions[state.id], state, event, now)
            outcomes[i] = ReplyResult(ReplyOutcome.APPLIED)
        await self._write(tx, changes)
        return outcomes, list(changes.values())

    async def timers(
        self,
        tx: StoreTransaction,
        now: datetime,
        limit: int,
        *,
        timeouts_due_by: datetime | None = None,
    ) -> tuple[int, list[Change]]:
        """Fire up to ``limit`` timers due at ``now`` inside ``tx`` (timeouts only if
        due by ``timeouts_due_by``, see :meth:`StoreTransaction.due_timers`); how many
        fired, and the sagas they changed."""
        due_timers = await tx.due_timers(now, limit, timeouts_due_by=timeouts_due_by)
        # Their rows are locked with the timers already: this only reads them, at once.
        states = await tx.lock_sagas(due.saga_id for due in due_timers)
        changes = _Changes()
        holds: dict[str, str] = {}
        fired = 0
        for due in due_timers:
            state = states.get(due.saga_id)
            if state is None:
                continue
            definition = self._definition(state, holds)
            if definition is None:
                continue
            at = self.clock()
            late: datetime | bool = False
            node = definition.step(due.timer.step)
            if due.timer.kind in TIMEOUTS and isinstance(node, Step):
                # Only a participant's message can still wait in the outbox (a wait
                # step's timeout times the application, not the broker).
                late = await self._published_late(tx, state.id, node.name, node.timeout)
            event = TimerDue(due.timer, late, self._unserved(definition, due.timer))
            fired += self._advance(changes, definition, state, event, at)
        await self._hold(tx, holds, [], states)
        await self._write(tx, changes)
        return fired, list(changes.values())

    def _unserved(self, definition: Saga, timer: Timer) -> str | None:
        """Why a step timeout's command may have got no reply: nobody reads its
        participant's destination, if the relay knows that."""
        node = definition.step(timer.step)
        if self.unserved is None or timer.kind is not TimerKind.STEP_TIMEOUT:
            return None
        if not isinstance(node, Step):
            return None
        return self.unserved(self.topology.commands(node.participant))

    # -- sagas this engine does not serve (engine/served.py, engine/held.py) ---------

    def _definition(self, state: SagaState, holds: dict[str, str]) -> Saga | None:
        """The definition to advance ``state`` with; None if this engine must not
        touch it: it is held (it resumes only through the held-saga scan, its kept
        replies first), another live engine serves it (left to that one, said once),
        or none does (its reason goes in ``holds``: the caller holds it). Never a
        definition of the same version with another fingerprint: the saga would run
        steps it never had."""
        if state.held is not None:
            return None
        definition = self.serving.definition(state)
        if definition is not None or state.id in holds:
            return definition
        if not self.serving.elsewhere(state):
            holds[state.id] = self.serving.why_not(state)
        elif state.id not in self._foreign:
            self._foreign.add(state.id)
            with saga_context(state.id, None):
                log.info(
                    "leaving saga %s to an engine that serves it: %s",
                    state.id,
                    self.serving.why_not(state),
                )
        return None

    async def _hold(
        self,
        tx: StoreTransaction,
        holds: Mapping[str, str],
        kept: Sequence[Envelope],
        states: Mapping[str, SagaState],
    ) -> None:
        """Inside ``tx``: hold the sagas of ``holds`` (their timers pause; history and
        one log line say why) and keep the ``kept`` replies for an engine that serves
        their saga."""
        if not holds and not kept:
            return
        now = self.clock()
        await tx.keep_replies([KeptReply(r.message_id, r.saga_id, encode(r), now) for r in kept])
        if holds:
            await tx.hold_sagas(holds, now)
            await tx.add_histories(
                [(saga_id, HistoryEntry(now, "held", None, why)) for saga_id, why in holds.items()]
            )
            for saga_id, why in holds.items():
                with saga_context(saga_id, None):
                    log.warning("holding saga %s: %s", saga_id, why)
        if any(self.serving.definition(states[r.saga_id]) is not None for r in kept):
            self._kept_for_us = True

    async def _published_late(
        self, tx: StoreTransaction, saga_id: str, step: str, timeout: timedelta
    ) -> datetime | bool:
        """True if the message a timeout times is still unsent; when it went out, if
        that was less than its timeout ago (the deadline was set when the step was
        written, and an engine or broker that was down relayed it only then); else
        False."""
        # The step's own messages: another branch's say nothing of this one's.
        if await tx.has_unsent(saga_id, step):
            return True
        sent = await tx.last_sent(saga_id, step)
        if sent is not None and sent + timeout > self.clock():
            return sent
        return False

    async def undeliverable(
        self, tx: StoreTransaction, refused: Sequence[Undeliverable]
    ) -> Callable[[], None]:
        """Advance the sagas of outbox rows the broker refused for good, in the relay's
        transaction (:meth:`Transition.on_undeliverable`); what to do once it committed.

        The relay holds those rows' locks; the sagas are locked now, in id order, as
        for replies. Nothing that holds a saga's lock waits for an outbox row's
        (replies and timers only insert new rows), so the two cannot deadlock.
        """
        found: list[Undelivered] = []
        for item in refused:
            try:
                found.append(Undelivered(decode(item.record.body, ANY_SIZE), item.reason))
            except DecodeError:
                continue  # not one of ours (a replayed dead letter): archived only
        states = await tx.lock_sagas(event.message.saga_id for event in found)
        changes = _Changes()
        holds: dict[str, str] = {}
        now = self.clock()
        for event in found:
            state = states.get(event.message.saga_id)
            if state is None:
                continue
            definition = self._definition(state, holds)
            if definition is None:
                # Archived as a dead letter by the relay; the step's timeout, once an
                # engine serves the saga, decides what became of it.
                continue
            self._advance(changes, definition, state, event, now)
        await self._hold(tx, holds, [], states)
        await self._write(tx, changes)
        return lambda: self.committed(changes.values())


def _emitted(changed: Iterable[Change]) -> bool:
    return any(messages for _, messages, _ in changed)
