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


#: Timers that end a wait for a reply (the others end a backoff): postponed while
#: their message is unpublished, held while a reply may wait unapplied.
TIMEOUTS = (TimerKind.STEP_TIMEOUT, TimerKind.COMPENSATION_TIMEOUT)


@dataclass(frozen=True)
class Timer:
    """A saga's one pending timer; a saga never waits on two things at once."""

    kind: TimerKind
    step: str
    attempt: int
    due_at: datetime


@dataclass(frozen=True)
class Awaiting:
    """The attempt token of the one reply the saga accepts next."""

    step: str
    kind: MessageKind
    attempt: int


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
    awaiting: Awaiting | None = None
    timer: Timer | None = None
    error: str | None = None
    trace_id: str | None = None
    #: W3C trace context (traceparent, ...) of the saga's latest step: a timer or an
    #: operator action resumes the saga's trace from it, even after a crash.
    trace_context: dict[str, str] = field(default_factory=dict)
    #: Optimistic concurrency: the version read; the write must find it unchanged.
    row_version: int = 0
    #: :attr:`Saga.fingerprint <engine.definition.Saga.fingerprint>` of the definition
    #: it started with; None (sagas started before it was recorded): trusted by any
    #: definition of the same name and version.
    fingerprint: str | None = None
    #: Why no engine advances it now (see :mod:`engine.held`); None: it is not held.
    #: Read with the image, written only by the store's hold and release.
    held: str | None = None

    def ordered_steps(self) -> list[StepState]:
        return sorted(self.steps.values(), key=lambda s: s.position)
