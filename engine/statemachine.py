"""The saga state machine: pure decisions, no I/O.

Each event (start, reply, timer) changes a :class:`SagaState` and collects the
messages and history entries that must be persisted with that change, in one
transaction, by the caller. Keeping I/O out makes every rule testable on its own and
lets the engine batch many transitions into one database transaction.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from engine.definition import Saga, Step, StepContext, build_payload
from engine.errors import LimitError, OperationRefused
from engine.limits import DEFAULT_LIMITS, ERROR_LENGTH, Limits, clip
from engine.messages import LAST_ATTEMPT_HEADER, Envelope, MessageKind, Outcome, sized
from engine.model import (
    Awaiting,
    HistoryEntry,
    OutboxMessage,
    SagaState,
    StepState,
    Timer,
    TimerKind,
)
from engine.states import SagaStatus, StepStatus
from engine.topology import Topology

_COMPENSABLE = (
    StepStatus.SUCCEEDED,
    StepStatus.TIMED_OUT,
    StepStatus.CANCELLED,
    StepStatus.COMPENSATING,
)


def new_saga(
    definition: Saga,
    saga_id: str,
    input_data: Mapping[str, Any],
    now: datetime,
) -> SagaState:
    state = SagaState(
        id=saga_id,
        name=definition.name,
        version=definition.version,
        input=dict(input_data),
        created_at=now,
        updated_at=now,
        fingerprint=definition.fingerprint,
    )
    for position, step in enumerate(definition.steps):
        state.steps[step.name] = StepState(name=step.name, position=position)
    return state


class Transition:
    """One event applied to one saga; read ``messages`` and ``history`` afterwards."""

    def __init__(
        self,
        definition: Saga,
        state: SagaState,
        *,
        now: datetime,
        topology: Topology,
        rng: random.Random | None = None,
        headers: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if definition.key != (state.name, state.version):
            raise ValueError(f"definition {definition.key} does not match saga {state.name}")
        self.definition = definition
        self.state = state
        self.now = now
        self.topology = topology
        self.rng = rng or random.Random()
        self.headers = dict(headers or {})
        self.limits = limits
        self.messages: list[OutboxMessage] = []
        self.history: list[HistoryEntry] = []
        #: Why a built command or compensation was not emitted (over the size limit,
        #: or holding a NUL), if one was not; ``start`` refuses such an input.
        self.refused: LimitError | None = None

    # -- events ------------------------------------------------------------------

    def start(self) -> None:
        self._record("started")
        self._dispatch(self.definition.steps[0])

    def on_reply(self, reply: Envelope) -> bool:
        """Apply a participant's reply; False if it is not the one the saga awaits."""
        token = self.state.awaiting
        if (
            token is None
            or reply.step != token.step
            or reply.in_reply_to is not token.kind
            or reply.attempt != token.attempt
        ):
            self._record(
                "reply_ignored",
                reply.step,
                f"{reply.in_reply_to} attempt {reply.attempt} ({reply.outcome}) is not awaited",
            )
            return False
        self.state.awaiting = None
        self.state.timer = None
        step = self.definition.step(reply.step)
        if token.kind is MessageKind.COMMAND:
            self._on_action_reply(step, reply)
        else:
            self._on_compensation_reply(step, reply)
        return True

    def on_undeliverable(self, message: Envelope, reason: str) -> bool:
        """The broker refused one of this saga's messages for good (too large, ...);
        False if the saga was not waiting for it (only its history records it).

        The participant never saw it, and sending it again cannot succeed. An awaited
        command fails its step, which is therefore not compensated itself: the saga
        compensates the steps before it (or, past the pivot, parks with this cause).
        An awaited compensation parks the saga: retrying cannot make it smaller.
        """
        token = self.state.awaiting
        what = f"{message.kind} {message.name} (attempt {message.attempt})"
        awaited = (
            token is not None
            and message.kind in (MessageKind.COMMAND, MessageKind.COMPENSATION)
            and (message.step, message.kind, message.attempt)
            == (token.step, token.kind, token.attempt)
        )
        self._record(
            "undeliverable",
            message.step if message.step in self.state.steps else None,
            f"{what} refused by the broker: {reason}"
            + ("" if awaited else "; the saga was not waiting for it"),
        )
        if not awaited:
            return False
        self.state.awaiting = None
        self.state.timer = None
        st = self.state.steps[message.step]
        if message.kind is MessageKind.COMPENSATION:
            st.error = f"compensation could not be delivered: {reason}"
            self._park(f"compensation of step {st.name!r} could not be delivered: {reason}")
            return True
        st.status = StepStatus.FAILED
        st.finished_at = self.now
        st.error = f"command could not be delivered: {reason}"
        self._record("step_failed", st.name, st.error)
        self._fail(f"step {st.name!r} failed: {st.error}")
        return True

    def postpone(self, timer: Timer, sent_at: datetime | None = None) -> bool:
        """A timeout fell due while the message it times still waits in the outbox (the
        broker is unreachable), or it went out only at ``sent_at``, less than a timeout
        before now (no engine ran to relay it). The participant has not had its time,
        so its outcome is not unknown: the timeout runs again from now, or from
        ``sent_at``, instead of compensating (and, after a long outage, parking) every
        saga that was in flight. False if stale."""
        if self.state.timer != timer:
            return False
        step = self.definition.step(timer.step)
        start = self.now if sent_at is None else sent_at
        self.state.timer = Timer(timer.kind, timer.step, timer.attempt, start + step.timeout)
        if sent_at is None:
            why = f"attempt {timer.attempt} is not published yet"
        else:
            why = f"attempt {timer.attempt} was published only at {sent_at.isoformat()}"
        self._record(
            "timeout_postponed",
            step.name,
            f"{why}; waiting until {step.timeout.total_seconds():g}s after that",
        )
        return True

    def on_timer(self, timer: Timer) -> bool:
        """Fire a due timer; False if the saga moved on and the timer is stale."""
        if self.state.timer != timer:
            return False
        self.state.timer = None
        state = self.state
        step = self.definition.step(timer.step)
        st = state.steps[timer.step]
        if timer.kind is TimerKind.STEP_TIMEOUT:
            state.awaiting = None
            st.status = StepStatus.TIMED_OUT
            st.finished_at = self.now
            st.error = f"no reply within {step.timeout.total_seconds():g}s (attempt {st.attempt})"
            self._record("step_timed_out", st.name, st.error)
            self._fail(f"step {st.name!r} timed out; its outcome is unknown")
        elif timer.kind is TimerKind.RETRY:
            self._dispatch(step)
        elif timer.kind is TimerKind.COMPENSATION_TIMEOUT:
            state.awaiting = None
            self._compensation_error(step, st, f"no reply within {step.timeout.total_seconds():g}s")
        else:
            self._dispatch_compensation(step)
        return True

    # -- operator events ---------------------------------------------------------

    def operator_retry(self, actor: str, reason: str | None = None) -> str:
        """An operator's retry: resume a parked saga, or end a retry backoff now.

        The retried step (or compensation) gets a fresh attempt budget and is
        dispatched at once with a new, higher attempt token, so a late reply to an
        earlier attempt is still told apart and ignored. Returns what was done, in
        words; raises :class:`OperationRefused` where a retry means nothing.
        """
        state = self.state
        name, kind = self._retry_target()
        step = self.definition.step(name)
        st = state.steps[name]
        state.awaiting = None
        state.timer = None
        if kind is MessageKind.COMPENSATION:
            st.compensation_attempt_base = st.compensation_attempt
            state.status = SagaStatus.COMPENSATING
            what = (
                f"compensation of step {name!r} dispatched as attempt "
                f"{st.compensation_attempt + 1}, with a fresh budget of "
                f"{step.compensation_retry.max_attempts} attempts"
            )
            self._operator("retried", name, what, actor, reason)
            self._dispatch_compensation(step)
        else:
            st.attempt_base = st.attempt
            st.finished_at = None
            st.error = None
            state.status = SagaStatus.RUNNING
            state.error = None
            what = (
                f"step {name!r} dispatched as attempt {st.attempt + 1}, with a fresh "
                f"budget of {step.retry.max_attempts} attempts"
            )
            self._operator("retried", name, what, actor, reason)
            self._dispatch(step)
        return what

    def _retry_target(self) -> tuple[str, MessageKind]:
        """The step (and which half of it) an operator retry dispatches again."""
        state = self.state
        if state.status.is_terminal:
            raise OperationRefused(f"saga {state.id} is {state.status}: there is nothing to retry")
        if state.status is SagaStatus.PARKED:
            ordered = state.ordered_steps()
            undoing = [st for st in ordered if st.status is StepStatus.COMPENSATING]
            if undoing:
                # Parked because this compensation kept failing (or could not be built).
                return undoing[-1].name, MessageKind.COMPENSATION
            if any(st.status is StepStatus.COMPENSATED for st in ordered):
                raise OperationRefused(
                    f"saga {state.id} is parked half compensated with no compensation "
                    "pending: there is nothing to retry"
                )
            # Parked going backward at a step without compensation (the pivot or after
            # it): such a saga can only go forward, so retry the first unfinished step.
            for st in ordered:
                if st.status is not StepStatus.SUCCEEDED:
                    return st.name, MessageKind.COMMAND
            raise OperationRefused(f"saga {state.id} is parked with every step succeeded")
        if state.awaiting is not None:
            token = state.awaiting
            raise OperationRefused(
                f"saga {state.id} is {state.status}: the {token.kind} of step {token.step!r} "
                f"(attempt {token.attempt}) is in flight; wait for its reply or timeout"
            )
        timer = state.timer
        if timer is not None and timer.kind is TimerKind.RETRY:
            return timer.step, MessageKind.COMMAND
        if timer is not None and timer.kind is TimerKind.COMPENSATION_RETRY:
            return timer.step, MessageKind.COMPENSATION
        raise OperationRefused(f"saga {state.id} is {state.status} and waits for nothing to retry")

    def cancel(self, actor: str, reason: str | None = None) -> str:
        """An operator stops a running saga and compensates what ran.

        The step in flight (or between two of its attempts) has an unknown outcome:
        it is compensated like a timed-out step, which the participant's barrier makes
        safe, then the completed steps in reverse order. A saga past its pivot cannot
        be undone, so it cannot be cancelled either.
        """
        state = self.state
        if state.status is not SagaStatus.RUNNING:
            why = {
                SagaStatus.COMPENSATING: "it is already compensating",
                SagaStatus.PARKED: "it is parked; retry it instead",
            }.get(state.status, "it has finished")
            raise OperationRefused(f"saga {state.id} is {state.status}: cannot cancel, {why}")
        for st in state.ordered_steps():
            if self.definition.step(st.name).compensation is None and st.attempt > 0:
                did = "succeeded" if st.status is StepStatus.SUCCEEDED else "been dispatched"
                raise OperationRefused(
                    f"saga {state.id} cannot be cancelled: step {st.name!r} has no "
                    f"compensation (it is the pivot or after it) and has {did}; "
                    "this saga can only go forward"
                )
        in_flight = [
            st
            for st in state.ordered_steps()
            if st.status in (StepStatus.DISPATCHED, StepStatus.PENDING) and st.attempt > 0
        ]
        undo = [st.name for st in reversed(state.ordered_steps()) if st.status in _COMPENSABLE]
        undo = [st.name for st in reversed(in_flight)] + undo
        what = f"compensating {', '.join(repr(n) for n in undo)}" if undo else "nothing ran to undo"
        self._operator("cancelled", None, what, actor, reason)
        for st in in_flight:
            st.status = StepStatus.CANCELLED
            st.finished_at = self.now
            st.error = f"cancelled by {actor} with attempt {st.attempt} in flight: outcome unknown"
            self._record("step_cancelled", st.name, st.error)
        state.awaiting = None
        state.timer = None
        self._fail(f"cancelled by {actor}" + (f": {reason}" if reason else ""))
        return what

    def _operator(
        self, event: str, step: str | None, what: str, actor: str, reason: str | None
    ) -> None:
        why = f"reason: {reason}" if reason else "no reason given"
        self._record(event, step, f"{why}; {what}", actor=actor)

    # -- forward -----------------------------------------------------------------

    def _dispatch(self, step: Step) -> None:
        st = self.state.steps[step.name]
        st.attempt += 1
        st.status = StepStatus.DISPATCHED
        st.started_at = st.started_at or self.now
        try:
            payload = build_payload(step.command, self._context())
        except Exception as exc:  # a bug in the user's builder: fail the step visibly
            st.status = StepStatus.FAILED
            st.finished_at = self.now
            st.error = f"command builder raised {_shown(exc)}"
            self._record("step_failed", st.name, st.error)
            self._fail(f"step {st.name!r} could not build its command: {_shown(exc)}")
            return
        refused = self._emit(step, MessageKind.COMMAND, step.action_name, st.attempt, payload)
        if refused is not None:  # like a builder that raised: the step fails visibly
            st.status = StepStatus.FAILED
            st.finished_at = self.now
            st.error = f"command not sent: {refused}"
            self._record("step_failed", st.name, st.error)
            self._fail(f"step {st.name!r} could not send its command: {refused}")
            return
        self.state.timer = Timer(
            TimerKind.STEP_TIMEOUT, step.name, st.attempt, self.now + step.timeout
        )

    def _on_action_reply(self, step: Step, reply: Envelope) -> None:
        st = self.state.steps[step.name]
        if reply.outcome is Outcome.SUCCESS:
            st.status = StepStatus.SUCCEEDED
            st.finished_at = self.now
            st.reply = dict(reply.payload)
            st.error = None
            self._record("step_succeeded", st.name, f"attempt {st.attempt}")
            position = self.definition.position(step.name)
            if position + 1 < len(self.definition.steps):
                self._dispatch(self.definition.steps[position + 1])
            else:
                self.state.status = SagaStatus.COMPLETED
                self._record("completed")
        elif reply.outcome is Outcome.FAILURE:
            st.status = StepStatus.FAILED
            st.finished_at = self.now
            st.error = reply.error or "business failure"
            self._record("step_failed", st.name, st.error)
            self._fail(f"step {st.name!r} failed: {st.error}")
        else:
            st.error = reply.error or "transient error"
            policy = step.retry
            used = st.attempt - st.attempt_base
            if used < policy.max_attempts:
                st.status = StepStatus.PENDING
                delay = policy.delay(used, self.rng)
                self.state.timer = Timer(TimerKind.RETRY, step.name, st.attempt, self._after(delay))
                self._record(
                    "step_error",
                    st.name,
                    f"attempt {st.attempt}/{st.attempt_base + policy.max_attempts}: {st.error}; "
                    f"retry in {delay:.3f}s",
                )
            else:
                st.status = StepStatus.FAILED
                st.finished_at = self.now
                self._record("step_failed", st.name, f"gave up after {used} attempts")
                if step.compensation is not None:
                    # Only this attempt is known to have rolled back: an earlier one may
                    # still be delivered (redelivery, a second publish) and run. So the
                    # step is compensated first, like a timed-out one; the participant's
                    # barrier makes that a no-op if it never ran and refuses it later.
                    st.status = StepStatus.COMPENSATING
                self._fail(f"step {st.name!r} failed after {used} attempts: {st.error}")

    # -- backward ----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self.state.error = reason
        self.state.status = SagaStatus.COMPENSATING
        self._record("compensating", detail=reason)
        self._compensate_next()

    def _compensate_next(self) -> None:
        for st in reversed(self.state.ordered_steps()):
            if st.status not in _COMPENSABLE:
                continue
            step = self.definition.step(st.name)
            if step.compensation is None:
                # Only ever reached first, from _fail: keep its real cause ahead.
                pivot = f"step {st.name!r} is a pivot ({st.status}) and cannot be compensated"
                self._park(f"{self.state.error}; {pivot}" if self.state.error else pivot)
                return
            st.status = StepStatus.COMPENSATING
            self._dispatch_compensation(step)
            return
        self.state.status = SagaStatus.COMPENSATED
        self._record("compensated")

    def _dispatch_compensation(self, step: Step) -> None:
        assert step.compensation is not None
        st = self.state.steps[step.name]
        st.compensation_attempt += 1
        try:
            payload = build_payload(step.compensation.build, self._context())
        except Exception as exc:  # retrying cannot fix a builder bug
            st.error = f"compensation builder raised {_shown(exc)}"
            self._park(f"compensation of step {st.name!r} could not be built: {_shown(exc)}")
            return
        refused = self._emit(
            step, MessageKind.COMPENSATION, step.compensation.name, st.compensation_attempt, payload
        )
        if refused is not None:  # retrying cannot shrink it either
            st.error = f"compensation not sent: {refused}"
            self._park(f"compensation of step {st.name!r} could not be sent: {refused}")
            return
        self.state.timer = Timer(
            TimerKind.COMPENSATION_TIMEOUT,
            step.name,
            st.compensation_attempt,
            self.now + step.timeout,
        )

    def _on_compensation_reply(self, step: Step, reply: Envelope) -> None:
        st = self.state.steps[step.name]
        if reply.outcome is Outcome.SUCCESS:
            st.status = StepStatus.COMPENSATED
            st.finished_at = self.now
            self._record("step_compensated", st.name, f"attempt {st.compensation_attempt}")
            self._compensate_next()
        else:
            self._compensation_error(step, st, reply.error or str(reply.outcome))

    def _compensation_error(self, step: Step, st: StepState, error: str) -> None:
        st.error = error
        policy = step.compensation_retry
        used = st.compensation_attempt - st.compensation_attempt_base
        if used < policy.max_attempts:
            delay = policy.delay(used, self.rng)
            self.state.timer = Timer(
                TimerKind.COMPENSATION_RETRY, step.name, st.compensation_attempt, self._after(delay)
            )
            limit = st.compensation_attempt_base + policy.max_attempts
            self._record(
                "compensation_error",
                st.name,
                f"attempt {st.compensation_attempt}/{limit}: {error}; retry in {delay:.3f}s",
            )
        else:
            self._park(f"compensation of step {st.name!r} failed {used} times: {error}")

    def _park(self, reason: str) -> None:
        self.state.status = SagaStatus.PARKED
        self.state.error = reason
        self.state.awaiting = None
        self.state.timer = None
        self._record("parked", detail=reason)

    # -- helpers -----------------------------------------------------------------

    def _context(self) -> StepContext:
        replies = {st.name: st.reply for st in self.state.steps.values() if st.reply is not None}
        return StepContext(
            saga_id=self.state.id,
            input=self.definition.parse_input(self.state.input),
            replies=replies,
        )

    def _emit(
        self, step: Step, kind: MessageKind, name: str, attempt: int, payload: dict[str, Any]
    ) -> LimitError | None:
        """Queue the message and await its reply; or, if it is over the limits, the
        refusal (nothing is queued)."""
        st = self.state.steps[step.name]
        if kind is MessageKind.COMMAND:
            last = st.attempt_base + step.retry.max_attempts
        else:
            last = st.compensation_attempt_base + step.compensation_retry.max_attempts
        envelope = Envelope(
            saga_id=self.state.id,
            saga_name=self.state.name,
            saga_version=self.state.version,
            step=step.name,
            kind=kind,
            name=name,
            attempt=attempt,
            payload=payload,
            created_at=self.now,
            headers={**self.headers, LAST_ATTEMPT_HEADER: str(last)},
        )
        try:
            sized(envelope, self.limits)
        except LimitError as exc:
            self.refused = exc
            return exc
        self.messages.append(
            OutboxMessage(self.topology.commands(step.participant), self.state.id, envelope)
        )
        self.state.awaiting = Awaiting(step.name, kind, attempt)
        return None

    def _after(self, seconds: float) -> datetime:
        return self.now + timedelta(seconds=seconds)

    def _record(
        self,
        event: str,
        step: str | None = None,
        detail: str | None = None,
        actor: str = "engine",
    ) -> None:
        self.state.updated_at = self.now
        self.history.append(HistoryEntry(self.now, event, step, detail, actor))


def _shown(exc: Exception) -> str:
    """A user builder's exception as stored for operators: a builder may put anything
    in it (a URL with a password), so it is redacted and bounded like a handler's error."""
    return clip(repr(exc), ERROR_LENGTH // 2)
