"""The saga state machine: pure decisions, no I/O.

Each event (start, reply, timer) changes a :class:`SagaState` and collects the
messages and history entries that must be persisted with that change, in one
transaction, by the caller. Keeping I/O out makes every rule testable on its own and
lets the engine batch many transitions into one database transaction.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from engine.definition import (
    Child,
    Delay,
    Local,
    Node,
    Saga,
    Stage,
    Step,
    StepContext,
    WaitFor,
    build_payload,
    is_pivot,
    timer_length,
    undoes,
)
from engine.errors import (
    BusinessFailure,
    DefinitionError,
    InvalidInputError,
    LimitError,
    OperationRefused,
)
from engine.limits import DEFAULT_LIMITS, ERROR_LENGTH, Limits, clip
from engine.messages import LAST_ATTEMPT_HEADER, Envelope, MessageKind, Outcome, sized
from engine.model import (
    HistoryEntry,
    OutboxMessage,
    ParentLink,
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
    """A saga about to start, with its steps and its business keys (refused like
    :meth:`Saga.business_keys <engine.definition.Saga.business_keys>` refuses them)."""
    state = SagaState(
        id=saga_id,
        name=definition.name,
        version=definition.version,
        input=dict(input_data),
        created_at=now,
        updated_at=now,
        fingerprint=definition.fingerprint,
        keys=definition.business_keys(input_data),
    )
    for position, node in enumerate(definition.nodes):
        state.steps[node.name] = StepState(
            name=node.name, position=position, lane=definition.lane(node.name)
        )
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
        #: Set while :meth:`_forward` runs; a step that succeeds meanwhile (a local
        #: step, a wait whose signal came early) asks for another pass instead.
        self._forwarding = False
        self._again = False
        #: Child sagas this change creates (:class:`Child`), to be started with it.
        self.spawned: list[tuple[Saga, SagaState]] = []
        #: Messages between a child saga and its parent: the engine applies them like
        #: replies (written with the change, see :mod:`engine.deferred`), no broker.
        self.notices: list[Envelope] = []

    # -- events ------------------------------------------------------------------

    def start(self) -> None:
        self._record("started")
        self._forward()

    def on_reply(self, reply: Envelope) -> bool:
        """Apply a participant's reply; False if it is not a reply the saga awaits."""
        st = self.state.steps.get(reply.step)
        token = st.token() if st is not None else None
        if (
            st is None
            or token is None
            or reply.in_reply_to is not token.kind
            or reply.attempt != token.attempt
        ):
            self._record(
                "reply_ignored",
                reply.step if st is not None else None,
                f"{reply.in_reply_to} attempt {reply.attempt} ({reply.outcome}) is not awaited",
            )
            return False
        node = self.definition.step(reply.step)
        assert isinstance(node, (Step, Child))  # the nodes that hold reply tokens
        if isinstance(node, Child):
            if reply.outcome is Outcome.ERROR:  # the child parked: not its last word
                self._child_parked(st, reply.error or "parked")
                return True
            st.error = None  # its child's outcome supersedes a park it told of
            if self.state.status is SagaStatus.RUNNING:
                # It may have named this child; another may still be parked.
                self.state.error = self._parked_child_error()
        st.awaiting = None
        st.timer = None
        if token.kind is MessageKind.COMMAND:
            self._on_action_reply(node, st, reply)
        else:
            self._on_compensation_reply(node, st, reply)
        return True

    def on_signal(self, event: str, payload: Mapping[str, Any], actor: str) -> str:
        """The application's event ``event`` for this saga (:class:`WaitFor`): it
        completes the step waiting for it, or is kept for a wait the saga has not
        reached yet. Returns what was done; refused where it means nothing."""
        state = self.state
        waits = self.definition.waits_for(event)
        if not waits:
            known = sorted({n.event_name for n in self.definition.nodes if isinstance(n, WaitFor)})
            raise OperationRefused(
                f"saga {state.name!r} v{state.version} waits for no event {event!r}"
                + (f" (it waits for: {', '.join(known)})" if known else " (it has no wait step)")
            )
        if state.status is not SagaStatus.RUNNING:
            raise OperationRefused(f"saga {state.id} is {state.status}: it takes no signal now")
        for node in waits:
            st = state.steps[node.name]
            if st.status is StepStatus.DISPATCHED and st.timer is not None:
                st.timer = None
                st.reply = dict(payload)
                what = f"step {node.name!r} completed"
                self._record("signal_received", node.name, f"{event!r}: {what}", actor=actor)
                self._succeed(st, f"signal {event!r}")
                return what
            if st.attempt == 0 and st.reply is None:
                st.reply = dict(payload)
                what = f"kept for step {node.name!r}, which the saga has not reached yet"
                self._record("signal_received", node.name, f"{event!r}: {what}", actor=actor)
                return what
        raise OperationRefused(
            f"saga {state.id} has already had its signal {event!r} "
            f"(step {waits[-1].name!r} is {state.steps[waits[-1].name].status})"
        )

    def on_child_request(self, request: Envelope) -> bool:
        """The parent saga asks this child to undo itself (it is compensating the
        step that started it): compensate what completed, or cancel what runs; the
        outcome is reported to the parent once compensated. False if stale."""
        state = self.state
        link = state.parent
        if link is None or (
            link.kind is MessageKind.COMPENSATION and request.attempt <= link.attempt
        ):
            self._record("request_ignored", None, f"{request.kind} attempt {request.attempt}")
            return False
        state.parent = ParentLink(
            link.id, link.name, link.version, link.step, MessageKind.COMPENSATION, request.attempt
        )
        self._record(
            "compensation_requested", None, f"by parent saga {link.id} (step {link.step!r})"
        )
        why = f"compensated at the request of its parent saga {link.id}"
        if state.status is SagaStatus.COMPENSATED:
            self._notify_parent()
        elif state.status is SagaStatus.COMPLETED:
            state.error = why
            state.status = SagaStatus.COMPENSATING
            self._record("compensating", detail=why)
            self._compensate_next()
        elif state.status is SagaStatus.RUNNING:
            self._stop(self._in_flight(), f"cancelled by its parent saga {link.id}")
            self._fail(f"cancelled by its parent saga {link.id}")
        # Compensating, or parked: the parent hears when it is compensated.
        return True

    def on_undeliverable(self, message: Envelope, reason: str) -> bool:
        """The broker refused one of this saga's messages for good (too large, ...);
        False if the saga was not waiting for it (only its history records it).

        The participant never saw it, and sending it again cannot succeed. An awaited
        command fails its step, which is therefore not compensated itself: the saga
        compensates the steps before it (or, past the pivot, parks with this cause).
        An awaited compensation parks the saga: retrying cannot make it smaller.
        """
        st = self.state.steps.get(message.step)
        token = st.token() if st is not None else None
        what = f"{message.kind} {message.name} (attempt {message.attempt})"
        awaited = (
            token is not None
            and message.kind in (MessageKind.COMMAND, MessageKind.COMPENSATION)
            and (message.step, message.kind, message.attempt)
            == (token.step, token.kind, token.attempt)
        )
        self._record(
            "undeliverable",
            message.step if st is not None else None,
            f"{what} refused by the broker: {reason}"
            + ("" if awaited else "; the saga was not waiting for it"),
        )
        if not awaited or st is None:
            return False
        st.awaiting = None
        st.timer = None
        if message.kind is MessageKind.COMPENSATION:
            st.error = f"compensation could not be delivered: {reason}"
            self._park(f"compensation of step {st.name!r} could not be delivered: {reason}")
            return True
        self._step_failed(st, f"command could not be delivered: {reason}")
        return True

    def postpone(self, timer: Timer, sent_at: datetime | None = None) -> bool:
        """A timeout fell due while the message it times still waits in the outbox (the
        broker is unreachable), or it went out only at ``sent_at``, less than a timeout
        before now (no engine ran to relay it). The participant has not had its time,
        so its outcome is not unknown: the timeout runs again from now, or from
        ``sent_at``, instead of compensating (and, after a long outage, parking) every
        saga that was in flight. False if stale."""
        st = self.state.steps.get(timer.step)
        if st is None or st.timer != timer:
            return False
        timeout = timer_length(self.definition.step(timer.step))
        start = self.now if sent_at is None else sent_at
        st.timer = Timer(timer.kind, timer.step, timer.attempt, start + timeout)
        if sent_at is None:
            why = f"attempt {timer.attempt} is not published yet"
        else:
            why = f"attempt {timer.attempt} was published only at {sent_at.isoformat()}"
        self._record(
            "timeout_postponed",
            timer.step,
            f"{why}; waiting until {timeout.total_seconds():g}s after that",
        )
        return True

    def on_timer(self, timer: Timer, cause: str | None = None) -> bool:
        """Fire a due timer; False if the saga moved on and the timer is stale. A step
        timeout's error ends with ``cause``: what is known of why no reply came."""
        st = self.state.steps.get(timer.step)
        if st is None or st.timer != timer:
            return False
        st.timer = None
        node = self.definition.step(timer.step)
        if timer.kind is TimerKind.STEP_TIMEOUT:
            st.awaiting = None
            self._timed_out(node, st, cause)
        elif timer.kind is TimerKind.RETRY:
            self._dispatch(node)
        elif timer.kind is TimerKind.DELAY:
            self._succeed(st, f"waited {timer_length(node).total_seconds():g}s")
        elif timer.kind is TimerKind.COMPENSATION_TIMEOUT:
            st.awaiting = None
            self._compensation_error(
                node, st, f"no reply within {timer_length(node).total_seconds():g}s"
            )
        else:
            self._dispatch_compensation(node)
        return True

    def _timed_out(self, node: Node, st: StepState, cause: str | None = None) -> None:
        seconds = timer_length(node).total_seconds()
        if isinstance(node, WaitFor):
            self._step_failed(st, f"no signal {node.event_name!r} within {seconds:g}s")
            return
        assert isinstance(node, Step)  # the other nodes' timers are not timeouts
        error = f"no reply within {seconds:g}s (attempt {st.attempt})"
        error += f"; {cause}" if cause else ""
        if self.definition.forward_only(st.name):
            # Past the pivot the saga can only go forward: a timeout is one more
            # failed attempt (the barrier answers a step that did run with its outcome).
            self._record("step_timed_out", st.name, error)
            self._transient(node, st, error)
            return
        st.status = StepStatus.TIMED_OUT
        st.finished_at = self.now
        st.error = error
        self._completed(st)
        self._record("step_timed_out", st.name, st.error)
        self._fail(f"step {st.name!r} timed out; its outcome is unknown")

    # -- operator events ---------------------------------------------------------

    def operator_retry(self, actor: str, reason: str | None = None) -> str:
        """An operator's retry: resume a parked saga, or end a retry backoff now.

        The retried steps (or compensation) get a fresh attempt budget and are
        dispatched at once with a new, higher attempt token, so a late reply to an
        earlier attempt is still told apart and ignored. Returns what was done, in
        words; raises :class:`OperationRefused` where a retry means nothing.
        """
        state = self.state
        names, kind = self._retry_targets()
        for name in names:
            state.steps[name].awaiting = None
            state.steps[name].timer = None
        if kind is MessageKind.COMPENSATION:
            (name,) = names
            node = self.definition.step(name)
            st = state.steps[name]
            st.compensation_attempt_base = st.compensation_attempt
            state.status = SagaStatus.COMPENSATING
            what = (
                f"compensation of step {name!r} dispatched as attempt "
                f"{st.compensation_attempt + 1}, with a fresh budget of "
                f"{_budget(node, compensation=True)}"
            )
            self._operator("retried", name, what, actor, reason)
            self._dispatch_compensation(node)
            return what
        state.status = SagaStatus.RUNNING
        state.error = None
        said: list[str] = []
        for name in names:
            node = self.definition.step(name)
            st = state.steps[name]
            st.attempt_base = st.attempt
            st.finished_at = None
            st.error = None
            st.completed = None
            st.status = StepStatus.PENDING
            said.append(
                f"step {name!r} dispatched as attempt {st.attempt + 1}, with a fresh "
                f"budget of {_budget(node)}"
            )
        what = "; ".join(said)
        self._operator("retried", names[0] if len(names) == 1 else None, what, actor, reason)
        for name in names:
            if self.state.status is SagaStatus.RUNNING:
                self._dispatch(self.definition.step(name))
        self._forward()
        return what

    def _retry_targets(self) -> tuple[list[str], MessageKind]:
        """The steps (and which half of them) an operator retry dispatches again."""
        state = self.state
        if state.status.is_terminal:
            raise OperationRefused(f"saga {state.id} is {state.status}: there is nothing to retry")
        if state.status is SagaStatus.PARKED:
            ordered = state.ordered_steps()
            undoing = [st for st in ordered if st.status is StepStatus.COMPENSATING]
            if undoing:
                # Parked because this compensation kept failing (or could not be built).
                latest = max(undoing, key=_completion_order)
                return [latest.name], MessageKind.COMPENSATION
            if any(st.status is StepStatus.COMPENSATED for st in ordered):
                raise OperationRefused(
                    f"saga {state.id} is parked half compensated with no compensation "
                    "pending: there is nothing to retry"
                )
            # Parked going backward at a step without compensation (the pivot or after
            # it): such a saga can only go forward, so retry what is unfinished.
            stage = self._current_stage()
            if stage is None:
                raise OperationRefused(f"saga {state.id} is parked with every step succeeded")
            unfinished = [
                name
                for branch in stage.branches
                if (name := self._cursor(branch)) is not None
                and state.steps[name].status is not StepStatus.SUCCEEDED
                and (state.steps[name].attempt > 0 or len(stage.branches) == 1)
            ]
            return unfinished, MessageKind.COMMAND
        backoffs = [t for t in state.timers() if t.kind is TimerKind.RETRY]
        if backoffs:
            return [t.step for t in backoffs], MessageKind.COMMAND
        compensation = [t for t in state.timers() if t.kind is TimerKind.COMPENSATION_RETRY]
        if compensation:
            return [compensation[0].step], MessageKind.COMPENSATION
        token = state.awaiting
        if token is not None and isinstance(self.definition.step(token.step), Child):
            child = child_id(state.id, token.step, state.steps[token.step].attempt)
            raise OperationRefused(
                f"saga {state.id} is {state.status}: step {token.step!r} waits for its child "
                f"saga {child}; retry or cancel that one"
            )
        if token is not None:
            raise OperationRefused(
                f"saga {state.id} is {state.status}: the {token.kind} of step {token.step!r} "
                f"(attempt {token.attempt}) is in flight; wait for its reply or timeout"
            )
        raise OperationRefused(f"saga {state.id} is {state.status} and waits for nothing to retry")

    def cancel(self, actor: str, reason: str | None = None) -> str:
        """An operator stops a running saga and compensates what ran.

        The steps in flight (or between two of their attempts) have an unknown
        outcome: they are compensated like timed-out steps, which the participant's
        barrier makes safe, then the completed steps in reverse order of completion.
        A saga past its pivot cannot be undone, so it cannot be cancelled either.
        """
        state = self.state
        if state.status is not SagaStatus.RUNNING:
            why = {
                SagaStatus.COMPENSATING: "it is already compensating",
                SagaStatus.PARKED: "it is parked; retry it instead",
            }.get(state.status, "it has finished")
            raise OperationRefused(f"saga {state.id} is {state.status}: cannot cancel, {why}")
        for st in state.ordered_steps():
            if is_pivot(self.definition.step(st.name)) and st.attempt > 0:
                did = "succeeded" if st.status is StepStatus.SUCCEEDED else "been dispatched"
                raise OperationRefused(
                    f"saga {state.id} cannot be cancelled: step {st.name!r} has no "
                    f"compensation (it is the pivot or after it) and has {did}; "
                    "this saga can only go forward"
                )
        in_flight = self._in_flight()
        undo = [
            st.name
            for st in reversed(in_flight)
            if undoes(node := self.definition.step(st.name))
            and not isinstance(node, Local)  # between attempts: it did not run
        ]
        undo += [st.name for st in self._to_compensate()]
        what = f"compensating {', '.join(repr(n) for n in undo)}" if undo else "nothing ran to undo"
        self._operator("cancelled", None, what, actor, reason)
        self._stop(in_flight, f"cancelled by {actor}")
        self._fail(f"cancelled by {actor}" + (f": {reason}" if reason else ""))
        return what

    def _operator(
        self, event: str, step: str | None, what: str, actor: str, reason: str | None
    ) -> None:
        why = f"reason: {reason}" if reason else "no reason given"
        self._record(event, step, f"{why}; {what}", actor=actor)

    # -- forward -----------------------------------------------------------------

    def _forward(self) -> None:
        """Dispatch what may run now; complete the saga when every stage has.

        Walks the stages in order: the first one not finished is the saga's place;
        in it, each begun branch runs its next node, and branches not begun start
        while the group's limit allows."""
        if self._forwarding:
            self._again = True
            return
        self._forwarding = True
        try:
            while self.state.status is SagaStatus.RUNNING:
                self._again = False
                stage = self._current_stage()
                if stage is None:
                    self.state.status = SagaStatus.COMPLETED
                    self._record("completed")
                    self._notify_parent()
                    return
                self._run(stage)
                if not self._again:
                    return
        finally:
            self._forwarding = False

    def _current_stage(self) -> Stage | None:
        """The first stage with a node not succeeded; None once all have (plain loops:
        this runs on every event, and a generator per stage cost more than the walk)."""
        steps = self.state.steps
        for stage in self.definition.stages:
            for branch in stage.branches:
                for name in branch:
                    if steps[name].status is not StepStatus.SUCCEEDED:
                        return stage
        return None

    def _cursor(self, branch: tuple[str, ...]) -> str | None:
        """A branch's first node not succeeded; None when it is done."""
        for name in branch:
            if self.state.steps[name].status is not StepStatus.SUCCEEDED:
                return name
        return None

    def _run(self, stage: Stage) -> None:
        steps = self.state.steps
        idle: list[str] = []
        running = 0
        for branch in stage.branches:
            cursor = self._cursor(branch)
            if cursor is None:
                continue
            if steps[branch[0]].attempt == 0 and cursor == branch[0]:
                idle.append(cursor)
                continue
            running += 1
            if steps[cursor].attempt == 0:
                self._dispatch(self.definition.step(cursor))
                if self.state.status is not SagaStatus.RUNNING:
                    return
        for cursor in idle:
            if stage.limit is not None and running >= stage.limit:
                return
            running += 1
            self._dispatch(self.definition.step(cursor))
            if self.state.status is not SagaStatus.RUNNING:
                return

    def _dispatch(self, node: Node) -> None:
        st = self.state.steps[node.name]
        st.attempt += 1
        st.status = StepStatus.DISPATCHED
        st.started_at = st.started_at or self.now
        if isinstance(node, Step):
            self._send_command(node, st)
        elif isinstance(node, WaitFor):
            if st.reply is not None:  # its signal came before the saga got here
                self._succeed(st, "its signal had come before")
            else:
                st.timer = Timer(TimerKind.STEP_TIMEOUT, node.name, st.attempt, self._at(node))
        elif isinstance(node, Delay):
            st.timer = Timer(TimerKind.DELAY, node.name, st.attempt, self._at(node))
        elif isinstance(node, Child):
            self._start_child(node, st)
        else:
            self._run_local(node, st)

    def _start_child(self, node: Child, st: StepState) -> None:
        """Start the child saga in this change; its outcome comes back as a reply."""
        state = self.state
        try:
            data = build_payload(node.input, self._context())
            node.saga.parse_input(data)
        except InvalidInputError as exc:
            self._step_failed(st, f"child saga input refused: {exc}")
            return
        except Exception as exc:  # a bug in the user's builder
            self._step_failed(st, f"child saga input builder raised {_shown(exc)}")
            return
        try:  # its own business keys, from its own definition
            child = new_saga(node.saga, child_id(state.id, node.name, st.attempt), data, self.now)
        except (InvalidInputError, LimitError, DefinitionError) as exc:
            self._step_failed(st, f"child saga keys refused: {exc}")
            return
        child.parent = ParentLink(
            state.id, state.name, state.version, node.name, MessageKind.COMMAND, st.attempt
        )
        child.trace_context = dict(state.trace_context)
        st.awaiting = MessageKind.COMMAND
        # Started by the advancer in this change (a first command it refuses fails
        # the child, which then answers this step with the failure).
        self.spawned.append((node.saga, child))
        self._record(
            "child_started", node.name, f"saga {node.saga.name!r} v{node.saga.version} {child.id}"
        )

    def _step_failed(self, st: StepState, error: str, reason: str | None = None) -> None:
        """The step failed for good with ``error``; the saga fails with ``reason``
        (by default: the step failed with that error)."""
        st.status = StepStatus.FAILED
        st.finished_at = self.now
        st.error = error
        self._record("step_failed", st.name, st.error)
        self._fail(reason or f"step {st.name!r} failed: {st.error}")

    def _notify_parent(self) -> None:
        """A child saga that finished tells its parent, answering the parent's last
        message to it: completed, the step succeeded; compensated, the step failed
        (or, asked to compensate, the compensation succeeded)."""
        state, request = self.state, self._parent_message()
        if request is None:
            return
        if state.status is SagaStatus.COMPLETED:
            replies = {st.name: st.reply for st in state.ordered_steps() if st.reply is not None}
            reply = request.reply(Outcome.SUCCESS, {"saga_id": state.id, "replies": replies})
            try:
                sized(reply, self.limits)
            except LimitError:  # the child's replies are in its own row anyway
                reply = request.reply(Outcome.SUCCESS, {"saga_id": state.id})
        elif request.kind is MessageKind.COMMAND:
            reply = request.reply(
                Outcome.FAILURE, {"saga_id": state.id}, f"child saga {state.id}: {state.error}"
            )
        else:
            reply = request.reply(Outcome.SUCCESS, {"saga_id": state.id})
        self.notices.append(reply)

    def _send_command(self, step: Step, st: StepState) -> None:
        try:
            payload = build_payload(step.command, self._context())
        except Exception as exc:  # a bug in the user's builder: fail the step visibly
            self._step_failed(
                st,
                f"command builder raised {_shown(exc)}",
                f"step {st.name!r} could not build its command: {_shown(exc)}",
            )
            return
        refused = self._emit(step, MessageKind.COMMAND, step.action_name, st.attempt, payload)
        if refused is not None:  # like a builder that raised: the step fails visibly
            self._step_failed(
                st,
                f"command not sent: {refused}",
                f"step {st.name!r} could not send its command: {refused}",
            )
            return
        st.timer = Timer(TimerKind.STEP_TIMEOUT, step.name, st.attempt, self.now + step.timeout)

    def _run_local(self, node: Local, st: StepState) -> None:
        try:
            result = node.run(self._context())
            reply = build_payload(lambda _: result, self._context()) if result is not None else {}
        except BusinessFailure as exc:
            self._step_failed(st, clip(str(exc) or "business failure", ERROR_LENGTH // 2))
            return
        except Exception as exc:  # retried like a participant's transient error
            self._transient(node, st, f"raised {_shown(exc)}")
            return
        st.reply = reply
        self._succeed(st, f"attempt {st.attempt}")

    def _succeed(self, st: StepState, detail: str) -> None:
        st.status = StepStatus.SUCCEEDED
        st.finished_at = self.now
        st.error = None
        self._completed(st)
        self._record("step_succeeded", st.name, detail)
        self._forward()

    def _on_action_reply(self, step: Step | Child, st: StepState, reply: Envelope) -> None:
        if reply.outcome is Outcome.SUCCESS:
            st.reply = dict(reply.payload)
            self._succeed(st, f"attempt {st.attempt}")
        elif reply.outcome is Outcome.FAILURE:
            self._step_failed(st, reply.error or "business failure")
        elif isinstance(step, Child):  # a child saga answers success or failure only
            self._step_failed(st, reply.error or str(reply.outcome))
        else:
            self._transient(step, st, reply.error or "transient error")

    def _transient(self, node: Step | Local, st: StepState, error: str) -> None:
        """A failed attempt that may be retried: back off, or give up under the policy."""
        st.error = error
        policy = node.retry
        used = st.attempt - st.attempt_base
        if policy.allows(used):
            st.status = StepStatus.PENDING
            delay = policy.delay(used, self.rng)
            st.timer = Timer(TimerKind.RETRY, node.name, st.attempt, self._after(delay))
            self._record(
                "step_error",
                st.name,
                f"attempt {st.attempt}/{policy.shown(st.attempt_base)}: {st.error}; "
                f"retry in {delay:.3f}s",
            )
            return
        st.status = StepStatus.FAILED
        st.finished_at = self.now
        self._record("step_failed", st.name, f"gave up after {used} attempts")
        if isinstance(node, Step) and node.compensation is not None:
            # Only this attempt is known to have rolled back: an earlier one may
            # still be delivered (redelivery, a second publish) and run. So the
            # step is compensated first, like a timed-out one; the participant's
            # barrier makes that a no-op if it never ran and refuses it later.
            st.status = StepStatus.COMPENSATING
            self._completed(st)
        self._fail(f"step {st.name!r} failed after {used} attempts: {st.error}")

    # -- backward ----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self.state.error = reason
        # Branches still in flight beside the failed one: their outcome is unknown.
        self._stop(self._in_flight(), f"stopped when {reason}")
        self.state.status = SagaStatus.COMPENSATING
        self._record("compensating", detail=reason)
        self._compensate_next()

    def _in_flight(self) -> list[StepState]:
        """Steps dispatched and unanswered, or between two attempts, in step order."""
        return [
            st
            for st in self.state.ordered_steps()
            if st.status in (StepStatus.DISPATCHED, StepStatus.PENDING) and st.attempt > 0
        ]

    def _stop(self, in_flight: list[StepState], why: str) -> None:
        for st in in_flight:
            st.awaiting = None
            st.timer = None
            st.status = StepStatus.CANCELLED
            st.finished_at = self.now
            st.error = f"{why} with attempt {st.attempt} in flight: outcome unknown"
            self._completed(st)
            self._record("step_cancelled", st.name, st.error)

    def _to_compensate(self) -> list[StepState]:
        """The steps still to undo, latest completed first; a pivot (or a step past
        it) among them stops the walk where it stands. Waits, delays and local steps
        without compensation have nothing to undo and are left as they are."""
        found = [
            st
            for st in self.state.steps.values()
            if st.status in _COMPENSABLE
            and (undoes(node := self.definition.step(st.name)) or is_pivot(node))
            and self._may_have_run(node, st)
        ]
        return sorted(found, key=_completion_order, reverse=True)

    def _may_have_run(self, node: Node, st: StepState) -> bool:
        """A local step stopped between its attempts did not run: each attempt that
        raised was rolled back with its transaction. Anything else stopped in flight
        may have."""
        return not (isinstance(node, Local) and st.status is StepStatus.CANCELLED)

    def _compensate_next(self) -> None:
        for st in self._to_compensate():
            node = self.definition.step(st.name)
            if not undoes(node):
                # Only ever reached first, from _fail: keep its real cause ahead.
                if self.definition.forward_only(st.name):
                    what = f"step {st.name!r} comes after the pivot ({st.status})"
                else:
                    what = f"step {st.name!r} is a pivot ({st.status})"
                pivot = f"{what} and cannot be compensated"
                self._park(f"{self.state.error}; {pivot}" if self.state.error else pivot)
                return
            st.status = StepStatus.COMPENSATING
            self._dispatch_compensation(node)
            return
        self.state.status = SagaStatus.COMPENSATED
        self._record("compensated")
        self._notify_parent()

    def _dispatch_compensation(self, node: Node) -> None:
        st = self.state.steps[node.name]
        st.compensation_attempt += 1
        if isinstance(node, Local):
            self._run_local_compensation(node, st)
            return
        if isinstance(node, Child):
            # The child compensates itself and answers; it always does, or parks
            # visibly, so there is no timeout.
            self.notices.append(
                Envelope(
                    saga_id=child_id(self.state.id, node.name, st.attempt),
                    saga_name=node.saga.name,
                    saga_version=node.saga.version,
                    step=node.name,
                    kind=MessageKind.COMPENSATION,
                    name=node.name,
                    attempt=st.compensation_attempt,
                    created_at=self.now,
                )
            )
            st.awaiting = MessageKind.COMPENSATION
            return
        assert isinstance(node, Step) and node.compensation is not None
        try:
            payload = build_payload(node.compensation.build, self._context())
        except Exception as exc:  # retrying cannot fix a builder bug
            st.error = f"compensation builder raised {_shown(exc)}"
            self._park(f"compensation of step {st.name!r} could not be built: {_shown(exc)}")
            return
        refused = self._emit(
            node, MessageKind.COMPENSATION, node.compensation.name, st.compensation_attempt, payload
        )
        if refused is not None:  # retrying cannot shrink it either
            st.error = f"compensation not sent: {refused}"
            self._park(f"compensation of step {st.name!r} could not be sent: {refused}")
            return
        st.timer = Timer(
            TimerKind.COMPENSATION_TIMEOUT,
            node.name,
            st.compensation_attempt,
            self.now + node.timeout,
        )

    def _run_local_compensation(self, node: Local, st: StepState) -> None:
        assert node.compensation is not None
        try:
            node.compensation(self._context())
        except Exception as exc:
            self._compensation_error(node, st, f"raised {_shown(exc)}")
            return
        self._compensated(st)

    def _on_compensation_reply(self, step: Step | Child, st: StepState, reply: Envelope) -> None:
        if reply.outcome is Outcome.SUCCESS:
            self._compensated(st)
        elif isinstance(step, Child):
            self._park(f"child saga of step {st.name!r} could not be compensated: {reply.error}")
        else:
            self._compensation_error(step, st, reply.error or str(reply.outcome))

    def _compensated(self, st: StepState) -> None:
        st.status = StepStatus.COMPENSATED
        st.finished_at = self.now
        self._record("step_compensated", st.name, f"attempt {st.compensation_attempt}")
        self._compensate_next()

    def _compensation_error(self, node: Node, st: StepState, error: str) -> None:
        st.error = error
        assert isinstance(node, (Step, Local))
        policy = node.compensation_retry
        used = st.compensation_attempt - st.compensation_attempt_base
        if policy.allows(used):
            delay = policy.delay(used, self.rng)
            st.timer = Timer(
                TimerKind.COMPENSATION_RETRY, node.name, st.compensation_attempt, self._after(delay)
            )
            self._record(
                "compensation_error",
                st.name,
                f"attempt {st.compensation_attempt}/"
                f"{policy.shown(st.compensation_attempt_base)}: {error}; retry in {delay:.3f}s",
            )
        else:
            self._park(f"compensation of step {st.name!r} failed {used} times: {error}")

    def _park(self, reason: str) -> None:
        self.state.status = SagaStatus.PARKED
        self.state.error = reason
        for st in self.state.steps.values():
            st.awaiting = None
            st.timer = None
        self._record("parked", detail=reason)
        self._tell_parent_parked(reason)

    def _parent_message(self) -> Envelope | None:
        """The parent's last message to this child (its start, or a request to
        compensate), which the child's notices answer; None for a saga of its own."""
        link = self.state.parent
        if link is None:
            return None
        return Envelope(
            saga_id=link.id,
            saga_name=link.name,
            saga_version=link.version,
            step=link.step,
            kind=link.kind,
            name=link.step,
            attempt=link.attempt,
            created_at=self.now,
        )

    def _tell_parent_parked(self, reason: str) -> None:
        """A parked child tells its parent, which keeps waiting for its outcome
        (an operator's retry or cancel of the child brings it) but shows why."""
        request = self._parent_message()
        if request is None:
            return
        self.notices.append(
            request.reply(
                Outcome.ERROR,
                {"saga_id": self.state.id, "parked": True},
                f"child saga {self.state.id} is parked: {reason}",
            )
        )

    def _child_parked(self, st: StepState, error: str) -> None:
        """The child saga of step ``st`` parked: the step still waits for it (its
        token stays), the saga's history and, while it runs, its error say why."""
        self._record("child_parked", st.name, error)
        st.error = error
        if self.state.status is SagaStatus.RUNNING:
            self.state.error = f"waiting for step {st.name!r}: {error}"

    def _parked_child_error(self) -> str | None:
        """The saga's error while a step still waits for a child that told it parked
        (the step keeps the child's word, see :meth:`_child_parked`); None if none."""
        for st in self.state.steps.values():
            node = self.definition.step(st.name)
            if isinstance(node, Child) and st.token() is not None and st.error:
                return f"waiting for step {st.name!r}: {st.error}"
        return None

    # -- helpers -----------------------------------------------------------------

    def _completed(self, st: StepState) -> None:
        """Number ``st`` after every step completed before it (see StepState.completed)."""
        latest = 0
        for other in self.state.steps.values():
            if other.completed is not None and other.completed > latest:
                latest = other.completed
        st.completed = latest + 1

    def _context(self) -> StepContext:
        replies = {
            st.name: st.reply
            for st in self.state.steps.values()
            if st.reply is not None and st.attempt > 0
        }
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
            policy, base = step.retry, st.attempt_base
        else:
            policy, base = step.compensation_retry, st.compensation_attempt_base
        headers = dict(self.headers)
        if policy.max_attempts is not None:
            headers[LAST_ATTEMPT_HEADER] = str(base + policy.max_attempts)
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
            headers=headers,
        )
        try:
            sized(envelope, self.limits)
        except LimitError as exc:
            self.refused = exc
            return exc
        self.messages.append(
            OutboxMessage(self.topology.commands(step.participant), self.state.id, envelope)
        )
        st.awaiting = kind
        return None

    def _at(self, node: Node) -> datetime:
        return self.now + timer_length(node)

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


def _budget(node: Node, *, compensation: bool = False) -> str:
    if isinstance(node, (Step, Local)):
        policy = node.compensation_retry if compensation else node.retry
        if policy.max_attempts is None:
            return "unlimited attempts"
        return f"{policy.max_attempts} attempts"
    return "one attempt"


def child_id(parent_id: str, step: str, attempt: int) -> str:
    """The id of the child saga a parent's step starts on its ``attempt``: derived, so
    the parent finds it again to compensate it, and a redone start is the same saga."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"saga:{parent_id}/{step}/{attempt}"))


def _completion_order(st: StepState) -> tuple[int, int]:
    """Sort key of completion: steps completed before StepState.completed existed
    (None) come first, in step order."""
    return (st.completed if st.completed is not None else -1, st.position)


def _shown(exc: Exception) -> str:
    """A user builder's exception as stored for operators: a builder may put anything
    in it (a URL with a password), so it is redacted and bounded like a handler's error."""
    return clip(repr(exc), ERROR_LENGTH // 2)
