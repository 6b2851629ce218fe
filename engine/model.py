"""In-memory image of one saga instance, as the state machine reads and writes it.

The store loads this image, the state machine changes it, the store writes it back in
the same transaction as the messages the change emits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from engine.messages import Envelope, MessageKind
from engine.states import SagaStatus, StepStatus


class TimerKind(StrEnum):
    STEP_TIMEOUT = "step_timeout"
    RETRY = "retry"
    COMPENSATION_TIMEOUT = "compensation_timeout"
    COMPENSATION_RETRY = "compensation_retry"
    #: A :class:`~engine.definition.Delay` node's end.
    DELAY = "delay"


#: Timers that end a wait for a reply (the others end a backoff): postponed while
#: their message is unpublished, held while a reply may wait unapplied.
TIMEOUTS = (TimerKind.STEP_TIMEOUT, TimerKind.COMPENSATION_TIMEOUT)


@dataclass(frozen=True)
class Timer:
    """A pending timer of one step; a step waits on one thing at a time, a saga on as
    many as it has branches in flight."""

    kind: TimerKind
    step: str
    attempt: int
    due_at: datetime


@dataclass(frozen=True)
class Awaiting:
    """The attempt token of a reply the saga accepts next (one per step in flight)."""

    step: str
    kind: MessageKind
    attempt: int


@dataclass(frozen=True)
class ParentLink:
    """Where a child saga reports its outcome: its parent's step, and the message of
    the parent it answers (the command that started it, or a request to compensate)."""

    id: str
    name: str
    version: int
    step: str
    kind: MessageKind
    attempt: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "step": self.step,
            "kind": self.kind.value,
            "attempt": self.attempt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParentLink:
        return cls(
            data["id"],
            data["name"],
            int(data["version"]),
            data["step"],
            MessageKind(data["kind"]),
            int(data["attempt"]),
        )


@dataclass
class StepState:
    name: str
    position: int
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    compensation_attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reply: dict[str, Any] | None = None
    error: str | None = None
    #: Attempts made before the current retry budget began. An operator retry starts
    #: a fresh budget here, so attempt numbers (the tokens) keep growing.
    attempt_base: int = 0
    compensation_attempt_base: int = 0
    #: The kind of reply this step waits for (its attempt is the current one), if any.
    awaiting: MessageKind | None = None
    #: The step's pending timer (a timeout, a retry's backoff, a delay), if any.
    timer: Timer | None = None
    #: When the step came to need compensating (succeeded, or its outcome became
    #: unknown), counted per saga: compensation runs in reverse of this order.
    completed: int | None = None
    #: ``group[branch]`` for a step inside a parallel group.
    lane: str | None = None

    def token(self) -> Awaiting | None:
        """The attempt token of the reply this step waits for, if it waits for one."""
        if self.awaiting is None:
            return None
        attempt = (
            self.attempt if self.awaiting is MessageKind.COMMAND else self.compensation_attempt
        )
        return Awaiting(self.name, self.awaiting, attempt)


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    event: str
    step: str | None = None
    detail: str | None = None
    actor: str = "engine"


@dataclass(frozen=True)
class OutboxMessage:
    destination: str
    key: str
    envelope: Envelope


@dataclass
class SagaState:
    id: str
    name: str
    version: int
    input: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    status: SagaStatus = SagaStatus.RUNNING
    steps: dict[str, StepState] = field(default_factory=dict)
    error: str | None = None
    trace_id: str | None = None
    #: W3C trace context (traceparent, ...) of the saga's latest step: a timer or an
    #: operator action resumes the saga's trace from it, even after a crash.
    trace_context: dict[str, str] = field(default_factory=dict)
    #: Optimistic concurrency: the version read; the write must find it unchanged.
    row_version: int = 0
    #: Set on a child saga: where its outcome goes.
    parent: ParentLink | None = None

    #: :attr:`Saga.fingerprint <engine.definition.Saga.fingerprint>` of the definition
    #: it started with; None (sagas started before it was recorded): trusted by any
    #: definition of the same name and version.
    fingerprint: str | None = None
    #: Why no engine advances it now (see :mod:`engine.held`); None: it is not held.
    #: Read with the image, written only by the store's hold and release.
    held: str | None = None
    #: Its business keys (:meth:`Saga.business_keys <engine.definition.Saga.business_keys>`),
    #: written with the saga row when it is created; not read back with the image.
    keys: dict[str, str] = field(default_factory=dict)

    def ordered_steps(self) -> list[StepState]:
        return sorted(self.steps.values(), key=lambda s: s.position)

    def tokens(self) -> list[Awaiting]:
        """Every reply the saga waits for, in step order."""
        return [t for st in self.ordered_steps() if (t := st.token()) is not None]

    def timers(self) -> list[Timer]:
        """Every pending timer, in step order."""
        return [st.timer for st in self.ordered_steps() if st.timer is not None]

    @property
    def awaiting(self) -> Awaiting | None:
        """The first reply the saga waits for (a straight-line saga waits for one)."""
        tokens = self.tokens()
        return tokens[0] if tokens else None

    @awaiting.setter
    def awaiting(self, token: Awaiting | None) -> None:
        for st in self.steps.values():
            st.awaiting = None
        if token is not None:
            self.steps[token.step].awaiting = token.kind

    @property
    def timer(self) -> Timer | None:
        """The first pending timer (a straight-line saga has one at most)."""
        timers = self.timers()
        return timers[0] if timers else None

    @timer.setter
    def timer(self, timer: Timer | None) -> None:
        for st in self.steps.values():
            st.timer = None
        if timer is not None:
            self.steps[timer.step].timer = timer
