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
from engine.messages import Envelope, MessageKind, Outcome
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

_COMPENSABLE = (StepStatus.SUCCEEDED, StepStatus.TIMED_OUT, StepStatus.COMPENSATING)


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
    ) -> None:
        if definition.key != (state.name, state.version):
            raise ValueError(f"definition {definition.key} does not match saga {state.name}")
        self.definition = definition
        self.state = state
        self.now = now
        self.topology = topology
        self.rng = rng or random.Random()
        self.headers = dict(headers or {})
        self.messages: list[OutboxMessage] = []
        self.history: list[HistoryEntry] = []

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
            st.error = f"command builder raised {exc!r}"
            self._record("step_failed", st.name, st.error)
            self._fail(f"step {st.name!r} could not build its command: {exc!r}")
            return
        self._emit(step, MessageKind.COMMAND, step.action_name, st.attempt, payload)
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
            if st.attempt < policy.max_attempts:
                st.status = StepStatus.PENDING
                delay = policy.delay(st.attempt, self.rng)
                self.state.timer = Timer(TimerKind.RETRY, step.name, st.attempt, self._after(delay))
                self._record(
                    "step_error",
                    st.name,
                    f"attempt {st.attempt}/{policy.max_attempts}: {st.error}; "
                    f"retry in {delay:.3f}s",
                )
            else:
                st.status = StepStatus.FAILED
                st.finished_at = self.now
                self._record("step_failed", st.name, f"gave up after {st.attempt} attempts")
                if step.compensation is not None:
                    # Only this attempt is known to have rolled back: an earlier one may
                    # still be delivered (redelivery, a second publish) and run. So the
                    # step is compensated first, like a timed-out one; the participant's
                    # barrier makes that a no-op if it never ran and refuses it later.
                    st.status = StepStatus.COMPENSATING
                self._fail(f"step {st.name!r} failed after {st.attempt} attempts: {st.error}")

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
                self._park(f"step {st.name!r} is a pivot ({st.status}) and cannot be compensated")
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
            st.error = f"compensation builder raised {exc!r}"
            self._park(f"compensation of step {st.name!r} could not be built: {exc!r}")
            return
        self._emit(
            step, MessageKind.COMPENSATION, step.compensation.name, st.compensation_attempt, payload
        )
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
        if st.compensation_attempt < policy.max_attempts:
            delay = policy.delay(st.compensation_attempt, self.rng)
            self.state.timer = Timer(
                TimerKind.COMPENSATION_RETRY, step.name, st.compensation_attempt, self._after(delay)
            )
            self._record(
                "compensation_error",
                st.name,
                f"attempt {st.compensation_attempt}/{policy.max_attempts}: {error}; "
                f"retry in {delay:.3f}s",
            )
        else:
            self._park(
                f"compensation of step {st.name!r} failed {st.compensation_attempt} times: {error}"
            )

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
    ) -> None:
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
            headers=self.headers,
        )
        self.messages.append(
            OutboxMessage(self.topology.commands(step.participant), self.state.id, envelope)
        )
        self.state.awaiting = Awaiting(step.name, kind, attempt)

    def _after(self, seconds: float) -> datetime:
        return self.now + timedelta(seconds=seconds)

    def _record(self, event: str, step: str | None = None, detail: str | None = None) -> None:
        self.state.updated_at = self.now
        self.history.append(HistoryEntry(self.now, event, step, detail))
