"""The state machine alone: Transition applied to SagaState images, no database."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from engine.definition import Compensation, RetryPolicy, Saga, Step, StepContext
from engine.messages import Envelope, MessageKind, Outcome
from engine.model import Awaiting, HistoryEntry, OutboxMessage, SagaState, Timer, TimerKind
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus, StepStatus
from engine.topology import Topology

T0 = datetime(2024, 1, 1, tzinfo=UTC)
RETRY = RetryPolicy(max_attempts=3, initial_backoff=1, multiplier=2, max_backoff=3, jitter=0)
COMP_RETRY = RetryPolicy(max_attempts=4, initial_backoff=1, multiplier=2, max_backoff=2, jitter=0)
TIMEOUT = timedelta(seconds=10)


class Trip(BaseModel):
    traveller: str


def _build(name: str) -> Any:
    def build(ctx: StepContext) -> dict[str, Any]:
        assert isinstance(ctx.input, Trip)
        return {
            "op": name,
            "saga": ctx.saga_id,
            "who": ctx.input.traveller,
            "seen": dict(ctx.replies),
        }

    return build


def step(name: str, *, compensated: bool = True, **kwargs: Any) -> Step:
    defaults: dict[str, Any] = {
        "retry": RETRY,
        "compensation_retry": COMP_RETRY,
        "timeout": TIMEOUT,
        "compensation": Compensation(f"undo_{name}", _build(f"undo_{name}"))
        if compensated
        else None,
    }
    defaults.update(kwargs)
    return Step(name=name, participant=f"p{name}", command=_build(name), **defaults)


TRIP = Saga(name="trip", version=1, input=Trip, steps=[step("a"), step("b"), step("c")])
NAMES = ["a", "b", "c"]


class Run:
    """Drives one saga through Transitions, collecting what they emit."""

    def __init__(self, definition: Saga = TRIP) -> None:
        self.definition = definition
        self.now = T0
        self.state: SagaState = new_saga(definition, "saga-1", {"traveller": "ann"}, T0)
        self.outbox: list[OutboxMessage] = []
        self.history: list[HistoryEntry] = []
        self.rng = random.Random(1)

    def transition(self) -> Transition:
        return Transition(
            self.definition, self.state, now=self.now, topology=Topology(), rng=self.rng
        )

    def _keep(self, tr: Transition) -> Transition:
        self.outbox += tr.messages
        self.history += tr.history
        return tr

    def start(self) -> Transition:
        tr = self.transition()
        tr.start()
        return self._keep(tr)

    @property
    def last(self) -> Envelope:
        return self.outbox[-1].envelope

    def reply(
        self,
        outcome: Outcome = Outcome.SUCCESS,
        to: Envelope | None = None,
        payload: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        self.now += timedelta(seconds=1)
        tr = self.transition()
        accepted = tr.on_reply((to or self.last).reply(outcome, payload, error))
        self._keep(tr)
        return accepted

    def fire(self, timer: Timer | None = None) -> bool:
        timer = timer or self.state.timer
        assert timer is not None
        self.now = max(self.now, timer.due_at)
        tr = self.transition()
        fired = tr.on_timer(timer)
        self._keep(tr)
        return fired

    def sent(self) -> list[tuple[str, MessageKind, str, int]]:
        return [
            (m.envelope.step, m.envelope.kind, m.envelope.name, m.envelope.attempt)
            for m in self.outbox
        ]

    def events(self) -> list[tuple[str, str | None]]:
        return [(h.event, h.step) for h in self.history]

    def statuses(self) -> dict[str, StepStatus]:
        return {name: st.status for name, st in self.state.steps.items()}

    def succeed_through(self, count: int) -> None:
        self.start()
        for _ in range(count):
            assert self.reply(Outcome.SUCCESS, payload={"done": self.last.step})


def cmd(step: str, attempt: int = 1) -> tuple[str, MessageKind, str, int]:
    return (step, MessageKind.COMMAND, step, attempt)


def comp(step: str, attempt: int = 1) -> tuple[str, MessageKind, str, int]:
    return (step, MessageKind.COMPENSATION, f"undo_{step}", attempt)


# -- start and happy path ----------------------------------------------------------


def test_new_saga_has_every_step_pending_in_order() -> None:
    state = new_saga(TRIP, "x", {"traveller": "bo"}, T0)
    assert state.status is SagaStatus.RUNNING
    assert [s.name for s in state.ordered_steps()] == NAMES
    assert all(s.status is StepStatus.PENDING and s.attempt == 0 for s in state.steps.values())
    assert (state.awaiting, state.timer, state.row_version) == (None, None, 0)


def test_start_dispatches_the_first_command_with_a_deadline() -> None:
    run = Run()
    run.start()
    assert run.sent() == [cmd("a")]
    message = run.outbox[0]
    assert message.destination == "saga.commands.pa"
    assert message.key == "saga-1"
    env = message.envelope
    assert (env.saga_name, env.saga_version, env.kind) == ("trip", 1, MessageKind.COMMAND)
    assert env.payload == {"op": "a", "saga": "saga-1", "who": "ann", "seen": {}}
    assert run.state.awaiting == Awaiting("a", MessageKind.COMMAND, 1)
    assert run.state.timer == Timer(TimerKind.STEP_TIMEOUT, "a", 1, T0 + TIMEOUT)
    assert run.state.steps["a"].status is StepStatus.DISPATCHED
    assert run.state.steps["a"].started_at == T0
    assert run.events() == [("started", None)]


def test_happy_path_dispatches_in_order_and_completes() -> None:
    run = Run()
    run.succeed_through(3)
    assert run.sent() == [cmd("a"), cmd("b"), cmd("c")]
    assert run.state.status is SagaStatus.COMPLETED
    assert run.statuses() == dict.fromkeys(NAMES, StepStatus.SUCCEEDED)
    assert run.state.awaiting is None and run.state.timer is None and run.state.error is None
    assert run.state.steps["b"].reply == {"done": "b"}
    # Later commands see the replies of the steps before them.
    assert run.outbox[2].envelope.payload["seen"] == {"a": {"done": "a"}, "b": {"done": "b"}}
    assert run.events() == [
        ("started", None),
        ("step_succeeded", "a"),
        ("step_succeeded", "b"),
        ("step_succeeded", "c"),
        ("completed", None),
    ]


def test_transition_refuses_a_definition_of_another_version() -> None:
    state = new_saga(TRIP, "x", {"traveller": "bo"}, T0)
    other = Saga(name="trip", version=2, input=Trip, steps=[step("a")])
    with pytest.raises(ValueError, match="does not match"):
        Transition(other, state, now=T0, topology=Topology())


# -- business failure --------------------------------------------------------------


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_business_failure_compensates_completed_steps_in_reverse(failing: int) -> None:
    run = Run()
    run.succeed_through(failing)
    assert run.reply(Outcome.FAILURE, error="no seats")
    bad = NAMES[failing]
    assert run.state.steps[bad].status is StepStatus.FAILED
    assert run.state.steps[bad].error == "no seats"
    assert run.state.error == f"step {bad!r} failed: no seats"
    done = list(reversed(NAMES[:failing]))
    for name in done:
        assert run.state.status is SagaStatus.COMPENSATING
        assert run.last.kind is MessageKind.COMPENSATION and run.last.step == name
        assert run.state.awaiting == Awaiting(name, MessageKind.COMPENSATION, 1)
        assert run.state.timer == Timer(TimerKind.COMPENSATION_TIMEOUT, name, 1, run.now + TIMEOUT)
        assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.sent() == [cmd(n) for n in NAMES[: failing + 1]] + [comp(n) for n in done]
    assert [s for e, s in run.events() if e == "step_compensated"] == done
    assert run.statuses() == {
        **{n: StepStatus.COMPENSATED for n in NAMES[:failing]},
        bad: StepStatus.FAILED,
        **{n: StepStatus.PENDING for n in NAMES[failing + 1 :]},
    }
    assert run.state.awaiting is None and run.state.timer is None
    assert run.events()[-1] == ("compensated", None)


def test_compensation_payload_sees_the_step_replies() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    assert run.last.name == "undo_a"
    assert run.last.payload["seen"] == {"a": {"done": "a"}}


# -- transient errors ---------------------------------------------------------------


def test_transient_error_schedules_a_retry_with_backoff_then_redispatches() -> None:
    run = Run()
    run.succeed_through(1)
    assert run.reply(Outcome.ERROR, error="db down")
    b = run.state.steps["b"]
    assert (b.status, b.attempt, b.error) == (StepStatus.PENDING, 1, "db down")
    assert run.state.awaiting is None
    assert run.state.timer == Timer(TimerKind.RETRY, "b", 1, run.now + timedelta(seconds=1))
    assert run.history[-1].event == "step_error"
    assert run.history[-1].detail == "attempt 1/3: db down; retry in 1.000s"
    assert run.sent() == [cmd("a"), cmd("b")]  # nothing sent until the timer fires

    assert run.fire()
    assert run.sent()[-1] == cmd("b", 2)
    assert run.state.awaiting == Awaiting("b", MessageKind.COMMAND, 2)
    assert run.state.timer == Timer(TimerKind.STEP_TIMEOUT, "b", 2, run.now + TIMEOUT)
    assert run.state.steps["b"].status is StepStatus.DISPATCHED

    first_error_at = run.now
    assert run.reply(Outcome.ERROR)
    assert run.state.timer is not None
    assert run.state.timer.due_at - first_error_at == timedelta(seconds=3)  # 1s later + 2s backoff
    assert run.state.steps["b"].error == "transient error"
    assert run.fire()
    assert run.reply(Outcome.SUCCESS, payload={"ok": True})
    assert run.state.steps["b"].status is StepStatus.SUCCEEDED
    assert run.state.steps["b"].attempt == 3
    assert run.state.steps["b"].error is None
    assert run.sent() == [cmd("a"), cmd("b", 1), cmd("b", 2), cmd("b", 3), cmd("c")]


def test_retry_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=1, multiplier=2, max_backoff=3, jitter=0)
    saga = Saga(name="one", version=1, input=Trip, steps=[step("a", retry=policy)])
    run = Run(saga)
    run.start()
    delays = []
    for _ in range(5):
        run.reply(Outcome.ERROR)
        assert run.state.timer is not None
        delays.append((run.state.timer.due_at - run.now).total_seconds())
        run.fire()
    assert delays == [1, 2, 3, 3, 3]


def test_retries_exhausted_fails_the_step_and_compensates() -> None:
    run = Run()
    run.succeed_through(1)
    for attempt in (1, 2, 3):
        assert run.last.attempt == attempt
        run.reply(Outcome.ERROR, error=f"boom {attempt}")
        if attempt < 3:
            run.fire()
    assert run.state.status is SagaStatus.COMPENSATING
    assert run.state.error == "step 'b' failed after 3 attempts: boom 3"
    assert ("step_failed", "b") in run.events()
    assert run.history[run.events().index(("step_failed", "b"))].detail == (
        "gave up after 3 attempts"
    )
    # An earlier attempt of b may still be delivered and run (a redelivery, a duplicate
    # publish), so b's outcome is unknown: it is compensated first, like a timed-out
    # step; the participant's barrier makes that a no-op if b never ran.
    assert run.sent()[-1] == comp("b")
    run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == comp("a")
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert [s for e, s in run.events() if e == "step_compensated"] == ["b", "a"]
    assert run.statuses() == {
        "a": StepStatus.COMPENSATED,
        "b": StepStatus.COMPENSATED,
        "c": StepStatus.PENDING,
    }


def test_retries_exhausted_on_a_pivot_only_compensates_the_steps_before_it() -> None:
    saga = Saga(
        name="pivoted", version=1, input=Trip, steps=[step("a"), step("b", compensated=False)]
    )
    run = Run(saga)
    run.succeed_through(1)
    for attempt in (1, 2, 3):
        run.reply(Outcome.ERROR)
        if attempt < 3:
            run.fire()
    assert run.state.steps["b"].status is StepStatus.FAILED
    assert run.sent()[-1] == comp("a")
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED


# -- timeouts ------------------------------------------------------------------------


def test_step_timeout_marks_timed_out_and_compensates_that_step_first() -> None:
    run = Run()
    run.succeed_through(2)
    timer = run.state.timer
    assert timer == Timer(TimerKind.STEP_TIMEOUT, "c", 1, run.now + TIMEOUT)
    assert run.fire()
    c = run.state.steps["c"]
    assert c.status is StepStatus.COMPENSATING  # timed out, and now being compensated
    assert c.error == "no reply within 10s (attempt 1)"
    assert ("step_timed_out", "c") in run.events()
    assert run.state.error == "step 'c' timed out; its outcome is unknown"
    assert run.sent()[-1] == comp("c")
    assert run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == comp("b")
    assert run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == comp("a")
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert [s for e, s in run.events() if e == "step_compensated"] == ["c", "b", "a"]


def test_late_reply_of_a_timed_out_step_is_ignored() -> None:
    run = Run()
    run.succeed_through(1)
    command_b = run.last
    run.fire()
    assert run.state.steps["b"].status is StepStatus.COMPENSATING
    before = copy.deepcopy(run.state)
    assert not run.reply(Outcome.SUCCESS, to=command_b)
    assert run.state.steps == before.steps
    assert run.state.awaiting == Awaiting("b", MessageKind.COMPENSATION, 1)
    assert run.history[-1].event == "reply_ignored"


def test_compensation_timeout_retries_the_compensation() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    assert run.state.timer is not None and run.state.timer.kind is TimerKind.COMPENSATION_TIMEOUT
    assert run.fire()
    assert run.state.awaiting is None
    assert run.state.timer is not None and run.state.timer.kind is TimerKind.COMPENSATION_RETRY
    assert run.state.steps["a"].error == "no reply within 10s"
    assert run.fire()
    assert run.sent()[-1] == comp("a", 2)
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED


# -- stale replies and timers ----------------------------------------------------------


def _ignored(run: Run, reply: Envelope) -> None:
    before = copy.deepcopy(run.state)
    tr = run.transition()
    assert tr.on_reply(reply) is False
    assert tr.messages == []
    assert [h.event for h in tr.history] == ["reply_ignored"]
    assert tr.history[0].step == reply.step
    assert f"attempt {reply.attempt}" in (tr.history[0].detail or "")
    before.updated_at = run.state.updated_at
    assert run.state == before


def test_reply_with_a_wrong_attempt_is_ignored_and_recorded() -> None:
    run = Run()
    run.start()
    run.reply(Outcome.ERROR)
    first = run.outbox[0].envelope
    run.fire()
    _ignored(run, first.reply(Outcome.SUCCESS))
    assert run.state.awaiting == Awaiting("a", MessageKind.COMMAND, 2)


def test_reply_for_a_wrong_step_is_ignored() -> None:
    run = Run()
    run.succeed_through(1)
    wrong = run.last.model_copy(update={"step": "c", "name": "c"})
    _ignored(run, wrong.reply(Outcome.SUCCESS))


def test_reply_of_a_wrong_kind_is_ignored() -> None:
    run = Run()
    run.succeed_through(1)
    as_compensation = run.last.model_copy(update={"kind": MessageKind.COMPENSATION})
    _ignored(run, as_compensation.reply(Outcome.SUCCESS))


def test_reply_after_completion_is_ignored() -> None:
    run = Run()
    run.succeed_through(3)
    _ignored(run, run.last.reply(Outcome.FAILURE))
    assert run.state.status is SagaStatus.COMPLETED


def test_duplicate_reply_is_ignored_the_second_time() -> None:
    run = Run()
    run.start()
    command_a = run.last
    assert run.reply(Outcome.SUCCESS, to=command_a)
    _ignored(run, command_a.reply(Outcome.SUCCESS))
    assert run.sent() == [cmd("a"), cmd("b")]


def test_stale_timer_does_nothing() -> None:
    run = Run()
    run.start()
    old = run.state.timer
    assert old is not None
    run.reply(Outcome.SUCCESS)
    before = copy.deepcopy(run.state)
    tr = run.transition()
    assert tr.on_timer(old) is False
    assert (tr.messages, tr.history) == ([], [])
    assert run.state == before
    # Same kind and step as the live timer, but another attempt: stale as well.
    live = run.state.timer
    assert live is not None
    assert (
        run.transition().on_timer(Timer(live.kind, live.step, live.attempt + 1, live.due_at))
        is False
    )
    assert run.state == before


# -- compensation errors -------------------------------------------------------------


def test_compensation_error_retries_with_capped_backoff_then_parks() -> None:
    run = Run()
    run.succeed_through(2)
    run.reply(Outcome.FAILURE, error="sold out")
    assert run.sent()[-1] == comp("b")
    delays = []
    for attempt in (1, 2, 3):
        assert run.reply(Outcome.ERROR if attempt % 2 else Outcome.FAILURE, error=f"e{attempt}")
        timer = run.state.timer
        assert timer is not None
        assert (timer.kind, timer.step, timer.attempt) == (
            TimerKind.COMPENSATION_RETRY,
            "b",
            attempt,
        )
        assert run.state.awaiting is None
        assert run.state.status is SagaStatus.COMPENSATING
        assert run.history[-1].event == "compensation_error"
        delays.append((timer.due_at - run.now).total_seconds())
        assert run.fire()
        assert run.sent()[-1] == comp("b", attempt + 1)
    assert delays == [1, 2, 2]
    assert run.reply(Outcome.ERROR, error="still broken")
    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == "compensation of step 'b' failed 4 times: still broken"
    assert run.state.steps["b"].error == "still broken"
    assert run.state.awaiting is None and run.state.timer is None
    assert run.events()[-1] == ("parked", None)
    assert comp("a") not in run.sent()  # nothing more happens by itself


def test_reply_to_a_parked_saga_is_ignored() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    undo = run.last
    for _ in range(4):
        run.reply(Outcome.ERROR)
        if run.state.status is not SagaStatus.PARKED:
            run.fire()
    assert run.state.status is SagaStatus.PARKED
    _ignored(run, undo.reply(Outcome.SUCCESS))


# -- pivots and builder bugs ----------------------------------------------------------

PIVOTED = Saga(
    name="pivoted",
    version=1,
    input=Trip,
    steps=[step("a"), step("pay", compensated=False), step("ship", compensated=False)],
)


def test_failure_after_the_pivot_parks_instead_of_compensating() -> None:
    run = Run(PIVOTED)
    run.succeed_through(2)
    assert run.reply(Outcome.FAILURE, error="carrier strike")
    assert run.state.status is SagaStatus.PARKED
    # The real cause first, then why the saga cannot be undone (issue 12).
    assert run.state.error == (
        "step 'ship' failed: carrier strike; "
        "step 'pay' is a pivot (succeeded) and cannot be compensated"
    )
    assert [k for _, k, _, _ in run.sent()].count(MessageKind.COMPENSATION) == 0
    assert run.statuses() == {
        "a": StepStatus.SUCCEEDED,
        "pay": StepStatus.SUCCEEDED,
        "ship": StepStatus.FAILED,
    }


def test_retries_exhausted_after_the_pivot_park_with_the_real_cause() -> None:
    run = Run(PIVOTED)
    run.succeed_through(2)
    for attempt in range(1, RETRY.max_attempts + 1):
        assert run.last.attempt == attempt
        assert run.reply(Outcome.ERROR, error=f"ConnectionError: carrier down {attempt}")
        if attempt < RETRY.max_attempts:
            run.fire()
    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == (
        f"step 'ship' failed after {RETRY.max_attempts} attempts: ConnectionError: carrier "
        f"down {RETRY.max_attempts}; step 'pay' is a pivot (succeeded) and cannot be compensated"
    )
    assert run.statuses()["ship"] is StepStatus.FAILED
    assert [k for _, k, _, _ in run.sent()].count(MessageKind.COMPENSATION) == 0


def test_failure_of_the_pivot_itself_compensates_the_steps_before_it() -> None:
    run = Run(PIVOTED)
    run.succeed_through(1)
    run.reply(Outcome.FAILURE, error="declined")
    assert run.sent()[-1] == comp("a")
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED


def test_timed_out_pivot_parks() -> None:
    run = Run(PIVOTED)
    run.succeed_through(1)
    run.fire()
    assert run.state.status is SagaStatus.PARKED
    assert "'pay' is a pivot (timed_out)" in (run.state.error or "")


def test_command_builder_bug_fails_the_step_visibly() -> None:
    def broken(ctx: StepContext) -> dict[str, Any]:
        raise KeyError("missing")

    saga = Saga(
        name="buggy",
        version=1,
        input=Trip,
        steps=[step("a"), Step(name="b", participant="pb", command=broken)],
    )
    run = Run(saga)
    run.succeed_through(1)
    b = run.state.steps["b"]
    assert b.status is StepStatus.FAILED
    assert b.error == "command builder raised KeyError('missing')"
    assert run.state.error is not None and "could not build its command" in run.state.error
    assert run.sent() == [cmd("a"), comp("a")]


def test_compensation_builder_bug_parks() -> None:
    def broken(ctx: StepContext) -> dict[str, Any]:
        raise ValueError("nope")

    saga = Saga(
        name="buggy",
        version=1,
        input=Trip,
        steps=[
            Step(
                name="a",
                participant="pa",
                command=_build("a"),
                compensation=Compensation("undo", broken),
            ),
            step("b"),
        ],
    )
    run = Run(saga)
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == "compensation of step 'a' could not be built: ValueError('nope')"
    assert run.state.timer is None and run.state.awaiting is None


# -- a message the broker refused for good ---------------------------------------------


def _refuse(run: Run, message: Envelope, reason: str = "message too large") -> Transition:
    run.now += timedelta(seconds=1)
    tr = run.transition()
    tr.on_undeliverable(message, reason)
    return run._keep(tr)


def test_a_refused_command_fails_its_step_and_compensates_the_steps_before_it() -> None:
    run = Run()
    run.succeed_through(1)
    command = run.last
    tr = _refuse(run, command)

    assert run.statuses()["b"] is StepStatus.FAILED
    assert run.state.steps["b"].error == "command could not be delivered: message too large"
    # The participant never saw it: only "a" is undone, and the saga waits for that.
    assert run.sent()[-1] == comp("a")
    assert [h.event for h in tr.history] == ["undeliverable", "step_failed", "compensating"]
    assert "command b (attempt 1) refused by the broker" in (tr.history[0].detail or "")
    assert run.state.status is SagaStatus.COMPENSATING
    assert run.state.error == "step 'b' failed: command could not be delivered: message too large"
    assert run.state.timer is not None and run.state.timer.kind is TimerKind.COMPENSATION_TIMEOUT
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.statuses() == {
        "a": StepStatus.COMPENSATED,
        "b": StepStatus.FAILED,
        "c": StepStatus.PENDING,
    }


def test_a_refused_first_command_compensates_nothing() -> None:
    run = Run()
    run.start()
    _refuse(run, run.last)
    assert run.state.status is SagaStatus.COMPENSATED
    assert [k for _, k, _, _ in run.sent()] == [MessageKind.COMMAND]


def test_a_refused_command_past_the_pivot_parks_with_the_real_cause() -> None:
    run = Run(PIVOTED)
    run.succeed_through(2)
    _refuse(run, run.last, "MessageSizeTooLargeError")

    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == (
        "step 'ship' failed: command could not be delivered: MessageSizeTooLargeError; "
        "step 'pay' is a pivot (succeeded) and cannot be compensated"
    )
    assert run.statuses()["ship"] is StepStatus.FAILED
    assert run.state.awaiting is None and run.state.timer is None
    assert [k for _, k, _, _ in run.sent()].count(MessageKind.COMPENSATION) == 0


def test_a_refused_compensation_parks_the_saga() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE, error="declined")
    undo = run.last
    assert (undo.step, undo.kind) == ("a", MessageKind.COMPENSATION)
    tr = _refuse(run, undo)

    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == "compensation of step 'a' could not be delivered: message too large"
    assert run.state.steps["a"].status is StepStatus.COMPENSATING  # an operator may retry it
    assert run.state.awaiting is None and run.state.timer is None
    assert tr.messages == []


@pytest.mark.parametrize("which", ["stale attempt", "reply", "finished saga"])
def test_a_refused_message_the_saga_does_not_wait_for_is_only_recorded(which: str) -> None:
    run = Run()
    run.start()
    first = run.last
    if which == "stale attempt":
        run.reply(Outcome.ERROR, error="db down")
        run.fire()  # attempt 2 is out; attempt 1 was dispatched again before, say
        message = first
    elif which == "reply":
        message = first.reply(Outcome.SUCCESS)
    else:
        run.reply(Outcome.SUCCESS)
        run.reply(Outcome.SUCCESS)
        run.reply(Outcome.SUCCESS)
        assert run.state.status is SagaStatus.COMPLETED
        message = first
    before = copy.deepcopy(run.state)
    run.now += timedelta(seconds=1)
    tr = run.transition()

    assert tr.on_undeliverable(message, "too large") is False
    assert tr.messages == []
    assert [(h.event, h.step) for h in tr.history] == [("undeliverable", "a")]
    assert "the saga was not waiting for it" in (tr.history[0].detail or "")
    before.updated_at = run.state.updated_at
    assert run.state == before


def test_a_builder_error_is_stored_redacted_and_bounded() -> None:
    def leaky(ctx: StepContext) -> dict[str, Any]:
        raise RuntimeError("cannot reach postgresql://u:Hunter2secretPW@db/x " + "y" * 9000)

    saga = Saga(
        name="leaky",
        version=1,
        input=Trip,
        steps=[step("a"), Step(name="b", participant="pb", command=leaky)],
    )
    run = Run(saga)
    run.succeed_through(1)
    b = run.state.steps["b"]
    assert b.error is not None and "postgresql://u:***@db/x" in b.error
    assert "Hunter2secretPW" not in b.error and len(b.error) < 4_100
    assert run.state.error is not None and "Hunter2secretPW" not in run.state.error
