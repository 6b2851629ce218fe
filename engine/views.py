"""Read models returned by the client and printed by ``sagactl``."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, computed_field

from engine.errors import DecodeError
from engine.messages import MessageKind, decode
from engine.states import SagaStatus, StepStatus
from engine.store.base import DeadLetterRecord, PruneCounts

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SagaCursor:
    """Where a page of sagas ended: the last saga's (created_at, id). Lists are in
    that order, descending, so the next page is every saga strictly after it: sagas
    that arrive meanwhile are newer and never shift a page.

    As text (``--after``): the creation time in microseconds since 1970, base 36, a
    dot, and the saga id; short enough for an 80-column terminal."""

    created_at: datetime
    saga_id: str

    def encode(self) -> str:
        """The cursor as text, for ``--after`` and the JSON of a list."""
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        return f"{_base36(micros)}.{self.saga_id}"

    @classmethod
    def decode(cls, text: str) -> SagaCursor:
        """A cursor from its text; ValueError naming what is wrong."""
        stamp, dot, saga_id = text.partition(".")
        try:
            micros = int(stamp, 36)
        except ValueError:
            micros = -1
        if not dot or not saga_id or micros < 0 or len(saga_id) > 36:
            raise ValueError(f"{text!r} is not a cursor (take one a list printed: --after CURSOR)")
        try:
            created = _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise ValueError(f"{text!r} is not a cursor (its time is out of range)") from None
        return cls(created, saga_id)


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


@dataclass(frozen=True)
class TimeRange:
    """A span of time: from ``start`` (included) to ``end`` (excluded); None: open."""

    start: datetime | None = None
    end: datetime | None = None


class SagaSummary(BaseModel):
    """One saga as a list shows it: name, version, status, times and its last error."""

    id: str
    name: str
    version: int
    status: SagaStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    #: Why no engine advances it now, if it is held (engine/held.py): it resumes by
    #: itself once an engine that serves its definition runs.
    held: str | None = None
    #: The fingerprint of the definition it started with (None before it was recorded).
    fingerprint: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cursor(self) -> str:
        """The cursor continuing a list after this saga (``sagactl list --after``)."""
        return SagaCursor(self.created_at, self.id).encode()


class StepView(BaseModel):
    """One step of a saga: its state, attempts, times, error and reply."""

    name: str
    position: int
    status: StepStatus
    attempts: int
    compensation_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    reply: dict[str, Any] | None
    #: ``group[branch]`` of a step inside a parallel group, else None.
    lane: str | None = None
    #: Completion order (compensation runs in reverse of it); None if not completed.
    completed: int | None = None


class HistoryView(BaseModel):
    at: datetime
    event: str
    step: str | None
    detail: str | None
    actor: str


#: What ends an awaited step's wait (:class:`AwaitView`).
AwaitKind = Literal[
    "reply", "compensation reply", "signal", "child saga", "retry", "compensation retry", "delay"
]


class AwaitView(BaseModel):
    """What a saga waits for at one step, and until when (``sagactl show``)."""

    step: str
    #: ``group[branch]`` of a step inside a parallel group, else None.
    lane: str | None = None
    #: ``reply``: the participant's answer to the command, ``compensation reply`` to
    #: the compensation; ``signal``: the application's event (a WaitFor step);
    #: ``child saga``: the child's outcome; ``retry`` / ``compensation retry``: the
    #: end of a backoff; ``delay``: the end of a Delay step.
    waits_for: AwaitKind
    #: The attempt awaited; for a retry, the attempt that comes next.
    attempt: int
    #: When the wait ends by itself: the timeout (the step fails, or its compensation
    #: errs), the end of a delay; None: no timer (a child saga's outcome).
    deadline: datetime | None = None
    #: When the next attempt goes, for a step between two attempts.
    next_retry: datetime | None = None
    #: Its message is still in the outbox, not published: no engine's relay has taken
    #: it (none running, or the broker is down). Its timeout waits for it.
    unsent: bool = False
    #: Since when the oldest unsent message of the step waits, if one does.
    queued_at: datetime | None = None


class TimerRow(BaseModel):
    """A pending timer of one step, as stored (:class:`PendingWork`)."""

    step: str
    kind: str
    attempt: int
    due_at: datetime


class PendingWork(BaseModel):
    """What a saga has in flight, as stored: the reply each step awaits, its timers,
    and the steps with a message not yet published. The client makes
    :class:`AwaitView` of it."""

    #: Step name -> the kind of reply it awaits (``command``, ``compensation``).
    awaiting: dict[str, MessageKind] = {}
    timers: list[TimerRow] = []
    #: Step name -> when its oldest unsent outbox message was written. Rows without a
    #: step (replayed dead letters, rows from before it was recorded) under None.
    unsent: dict[str | None, datetime] = {}


class SagaDetail(SagaSummary):
    """One saga in full: its input, trace, steps and history (``SagaClient.get``),
    and what it awaits now."""

    input: dict[str, Any]
    #: Its business keys, name -> value (``Saga(keys=...)``).
    keys: dict[str, str] = {}
    trace_id: str | None = None
    steps: list[StepView]
    history: list[HistoryView]
    #: What it waits for, step by step (empty once it is finished or parked); read
    #: by :meth:`SagaClient.get <engine.client.SagaClient.get>` just after the rest.
    awaits: list[AwaitView] = []


class DispatchView(BaseModel):
    """A message an operator action put in the outbox (the relay publishes it)."""

    destination: str
    step: str
    kind: MessageKind
    name: str
    attempt: int


class OperatorResult(BaseModel):
    """What ``retry`` or ``cancel`` did to one saga."""

    saga_id: str
    action: str
    actor: str
    reason: str | None
    previous_status: SagaStatus
    status: SagaStatus
    summary: str
    dispatched: list[DispatchView]


class DeadLetterView(BaseModel):
    """An archived dead letter, as ``sagactl dlq list`` shows it."""

    id: int
    received_at: datetime
    #: Where the message was consumed from; a replay sends it back there.
    source: str
    reason: str
    key: str
    saga_id: str | None
    #: What the body is, if it decodes to a saga envelope.
    kind: MessageKind | None = None
    name: str | None = None
    step: str | None = None
    attempt: int | None = None
    replayed_at: datetime | None = None
    replayed_by: str | None = None
    headers: dict[str, str]
    #: The body as text, or base64 when it is not UTF-8.
    body: str
    body_encoding: Literal["utf-8", "base64"]

    @classmethod
    def of(cls, body: bytes, **fields: Any) -> DeadLetterView:
        """The view of an archived row, describing the body if it is an envelope."""
        try:
            envelope = decode(body)
            fields.update(
                kind=envelope.kind,
                name=envelope.name,
                step=envelope.step,
                attempt=envelope.attempt,
            )
        except DecodeError:
            pass
        try:
            text, encoding = body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode("ascii"), "base64"
        return cls(body=text, body_encoding=encoding, **fields)


class ReplayResult(BaseModel):
    """What ``dlq replay`` did."""

    dead_letter: DeadLetterView
    destination: str
    actor: str
    reason: str | None
    #: The saga whose history recorded the replay, if the body names one that exists.
    saga_id: str | None


class DeadLetterRef(BaseModel):
    """A dead letter picked for a bulk replay: which, and the saga it names."""

    id: int
    saga_id: str | None
    source: str


class LetterReplay(BaseModel):
    """What a bulk replay did (or, dry, would do) with one dead letter."""

    id: int
    saga_id: str | None
    source: str
    #: ``replayed`` (or ``would replay`` in a dry run), else ``refused``.
    outcome: Literal["replayed", "would replay", "refused"]
    #: What the message is (``command reserve #1``), if its body is a saga envelope.
    message: str | None = None
    #: Why it was refused (the single replay's words), None otherwise.
    refusal: str | None = None


class BulkReplayResult(BaseModel):
    """What ``dlq replay --saga / --reason-contains / --all`` did, letter by letter,
    oldest first."""

    dry_run: bool
    saga_id: str | None
    reason_contains: str | None
    actor: str
    reason: str | None
    letters: list[LetterReplay]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def replayed(self) -> int:
        """Letters sent back (in a dry run: that would be)."""
        return sum(1 for letter in self.letters if letter.outcome != "refused")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def refused(self) -> int:
        """Letters refused, each with its reason in :attr:`letters`."""
        return sum(1 for letter in self.letters if letter.outcome == "refused")


class HeldCount(BaseModel):
    """How many sagas of one definition are held, and why the last one was."""

    name: str
    version: int
    count: int
    reason: str


class SagaCount(BaseModel):
    name: str
    status: SagaStatus
    count: int


class StoreStats(BaseModel):
    """Raw figures from the store; :class:`StatsView` adds ages."""

    counts: list[SagaCount]
    #: The oldest saga still in progress (running or compensating).
    oldest_running: SagaSummary | None
    outbox_unsent: int
    outbox_oldest_unsent_at: datetime | None
    dead_letters_pending: int
    dead_letters_total: int
    #: Replies set aside because their saga was not visible (yet).
    replies_deferred: int = 0
    #: Sagas held (no running engine serves them), by name and version.
    held: list[HeldCount] = []


class OldestRunning(BaseModel):
    id: str
    name: str
    status: SagaStatus
    created_at: datetime
    age_seconds: float


class OutboxStats(BaseModel):
    unsent: int
    oldest_unsent_age_seconds: float | None


class DeadLetterStats(BaseModel):
    not_replayed: int
    total: int


class StatsView(BaseModel):
    """``sagactl stats``: how the sagas stand and what is waiting."""

    at: datetime
    total: int
    by_status: dict[SagaStatus, int]
    #: Saga name -> status -> count (statuses without sagas left out).
    by_saga: dict[str, dict[SagaStatus, int]]
    oldest_running: OldestRunning | None
    outbox: OutboxStats
    dead_letters: DeadLetterStats
    #: Replies set aside because their saga was not visible (yet); each is applied or
    #: dead-lettered within the engine's patience.
    replies_deferred: int = 0
    #: Sagas held because no running engine serves them (each resumes by itself
    #: once one does), by name and version.
    held: list[HeldCount] = []


class RunningDefinition(BaseModel):
    """Sagas not finished (running, compensating, parked) of one definition: its
    name, version and the fingerprint they started with, and how many."""

    name: str
    version: int
    fingerprint: str | None
    count: int
    #: Some of their ids, oldest first.
    saga_ids: list[str]


class CheckedDefinition(RunningDefinition):
    """What a set of definitions would do with the unfinished sagas of one definition."""

    #: "version missing" or "fingerprint mismatch" (they would be held), or None.
    problem: str | None = None
    #: In words, for a problem.
    reason: str | None = None


class CheckView(BaseModel):
    """``sagactl check``: which unfinished sagas a set of definitions would hold."""

    #: The definitions checked, as "name vN (fingerprint ...)".
    loads: list[str]
    definitions: list[CheckedDefinition]
    #: Sagas they would hold (0: safe to deploy them alone).
    would_hold: int


class PruneResult(BaseModel):
    """``sagactl prune``: what went (or would go), and the cut-off it was judged by."""

    dry_run: bool
    older_than_seconds: float
    #: Finished sagas last changed before this instant were pruned.
    cutoff: datetime
    #: Transactions it took (0 for a dry run).
    batches: int
    rows: PruneCounts


class SagaPage(BaseModel):
    """A page of sagas, newest first, and the cursor of the next page (None: this is
    the last)."""

    sagas: list[SagaSummary]
    next: str | None = None


def dead_letter_view(letter: DeadLetterRecord) -> DeadLetterView:
    """How an archived dead letter is shown."""
    return DeadLetterView.of(
        letter.body,
        id=letter.id,
        received_at=letter.received_at,
        source=letter.source,
        reason=letter.reason,
        key=letter.key,
        saga_id=letter.saga_id,
        headers=letter.headers,
        replayed_at=letter.replayed_at,
        replayed_by=letter.replayed_by,
    )


__all__ = [
    "AwaitKind",
    "AwaitView",
    "BulkReplayResult",
    "CheckView",
    "CheckedDefinition",
    "DeadLetterRef",
    "DeadLetterStats",
    "DeadLetterView",
    "DispatchView",
    "HeldCount",
    "HistoryView",
    "LetterReplay",
    "OldestRunning",
    "OperatorResult",
    "OutboxStats",
    "PendingWork",
    "PruneCounts",
    "PruneResult",
    "ReplayResult",
    "RunningDefinition",
    "SagaCount",
    "SagaDetail",
    "SagaSummary",
    "StatsView",
    "StepView",
    "StoreStats",
    "TimerRow",
    "dead_letter_view",
]
