"""Operator events of the state machine: retry and cancel, as pure transitions."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from engine.definition import Compensation, Saga, Step, StepContext
from engine.errors import OperationRefused
from engine.messages import MessageKind, Outcome
from engine.model import Awaiting, Timer, TimerKind
from engine.states import SagaStatus, StepStatus
from tests.test_statemachine import (
    COMP_RETRY,
    NAMES,
    PIVOTED,
    RETRY,
    TIMEOUT,
    Run,
    Trip,
    _build,
    cmd,
    comp,
    step,
)

ALICE = "alice"


def park_on_compensation(run: Run) -> None:
    """Step c fails; b's compensation fails until its budget (4) runs out."""
    run.succeed_through(2)
    run.reply(Outcome.FAILURE, error="sold out")
    for _ in range(COMP_RETRY.max_attempts - 1):
        run.reply(Outcome.ERROR, error="refund service down")
        run.fire()
    run.reply(Outcome.ERROR, error="refund service down")
    assert run.state.status is SagaStatus.PARKED


def retry(run: Run, actor: str = ALICE, reason: str | None = "fixed it") -> str:
    run.now += timedelta(seconds=1)
    tr = run.transition()
    what = tr.operator_retry(actor, reason)
    run._keep(tr)
    return what


def cancel(run: Run, actor: str = ALICE, reason: str | None = "customer called") -> str:
    run.now += timedelta(seconds=1)
    tr = run.transition()
    what = tr.cancel(actor, reason)
    run._keep(tr)
    return what


def refused(run: Run, action: str, *fragments: str) -> None:
    """The action raises OperationRefused and changes nothing."""
    before = copy.deepcopy(run.state)
    tr = run.transition()
    with pytest.raises(OperationRefused) as info:
        getattr(tr, action)(ALICE, "why not")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert (tr.messages, tr.history) == ([], [])
    assert run.state == before


# -- retry of a parked compensation ---------------------------------------------------


def test_retry_resumes_a_parked_compensation_with_a_new_higher_attempt() -> None:
    run = Run()
    park_on_compensation(run)
    parked_at = len(run.outbox)
    what = retry(run)
    assert what == (
        "compensation of step 'b' dispatched as attempt 5, with a fresh budget of 4 attempts"
    )
    assert run.state.status is SagaStatus.COMPENSATING
    assert run.sent()[parked_at:] == [comp("b", 5)]
    assert run.state.awaiting == Awaiting("b", MessageKind.COMPENSATION, 5)
    assert run.state.timer == Timer(TimerKind.COMPENSATION_TIMEOUT, "b", 5, run.now + TIMEOUT)
    b = run.state.steps["b"]
    assert (b.compensation_attempt, b.compensation_attempt_base) == (5, 4)
    entry = run.history[-1]
    assert (entry.event, entry.step, entry.actor) == ("retried", "b", ALICE)
    assert entry.detail == f"reason: fixed it; {what}"

    # The participant works again: the saga finishes compensating, in reverse order.
    assert run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == comp("a")
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert [s for e, s in run.events() if e == "step_compensated"] == ["b", "a"]


def test_a_late_reply_to_an_attempt_before_the_retry_is_ignored() -> None:
    run = Run()
    park_on_compensation(run)
    old = run.last  # attempt 4, the one that parked the saga
    retry(run)
    before = copy.deepcopy(run.state)
    assert run.reply(Outcome.SUCCESS, to=old) is False
    assert run.history[-1].event == "reply_ignored"
    assert run.state.awaiting == before.awaiting
    assert run.state.status is SagaStatus.COMPENSATING


def test_a_retried_compensation_gets_the_whole_budget_and_backoff_again() -> None:
    run = Run()
    park_on_compensation(run)
    retry(run)
    delays = []
    for _ in range(COMP_RETRY.max_attempts - 1):
        run.reply(Outcome.ERROR, error="still down")
        timer = run.state.timer
        assert timer is not None and timer.kind is TimerKind.COMPENSATION_RETRY
        delays.append((timer.due_at - run.now).total_seconds())
        run.fire()
    assert delays == [1, 2, 2]  # from the initial backoff again, capped
    assert run.history[-1].detail == "attempt 7/8: still down; retry in 2.000s"
    run.reply(Outcome.ERROR, error="still down")
    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == "compensation of step 'b' failed 4 times: still down"
    assert run.state.steps["b"].compensation_attempt == 8
    # And again: the tokens keep growing.
    retry(run, actor="bob", reason=None)
    assert run.sent()[-1] == comp("b", 9)
    assert run.history[-1].actor == "bob"
    assert run.history[-1].detail is not None
    assert run.history[-1].detail.startswith("no reason given; ")


def test_retry_of_a_compensation_that_could_not_be_built() -> None:
    broken = True

    def build(ctx: StepContext) -> dict[str, Any]:
        if broken:
            raise ValueError("bug")
        return {"undo": ctx.saga_id}

    saga = Saga(
        name="buggy",
        version=1,
        input=Trip,
        steps=[
            Step(
                name="a",
                participant="pa",
                command=_build("a"),
                compensation=Compensation("undo_a", build),
            ),
            step("b"),
        ],
    )
    run = Run(saga)
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    assert run.state.status is SagaStatus.PARKED
    retry(run)  # still broken: parks again, visibly, sending nothing
    assert run.state.status is SagaStatus.PARKED
    assert run.sent() == [cmd("a"), cmd("b")]
    broken = False  # a fixed deployment
    retry(run)
    assert run.sent()[-1] == comp("a", 3)
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED


# -- retry going forward (parked at the pivot) -----------------------------------------


def test_retry_of_a_saga_parked_after_its_pivot_goes_forward() -> None:
    run = Run(PIVOTED)
    run.succeed_through(2)
    run.reply(Outcome.FAILURE, error="carrier strike")
    assert run.state.status is SagaStatus.PARKED
    what = retry(run)
    assert what == "step 'ship' dispatched as attempt 2, with a fresh budget of 3 attempts"
    assert run.state.status is SagaStatus.RUNNING
    assert run.state.error is None
    ship = run.state.steps["ship"]
    assert (ship.status, ship.attempt, ship.attempt_base, ship.error) == (
        StepStatus.DISPATCHED,
        2,
        1,
        None,
    )
    assert run.sent()[-1] == cmd("ship", 2)
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPLETED


def test_retry_of_a_step_whose_retries_ran_out_gets_a_fresh_budget() -> None:
    run = Run(PIVOTED)
    run.succeed_through(2)
    for _ in range(RETRY.max_attempts - 1):
        run.reply(Outcome.ERROR, error="flaky")
        run.fire()
    run.reply(Outcome.ERROR, error="flaky")
    assert run.state.status is SagaStatus.PARKED
    assert run.history[-3].detail == "gave up after 3 attempts"
    retry(run)
    assert run.sent()[-1] == cmd("ship", 4)
    run.reply(Outcome.ERROR, error="flaky")
    timer = run.state.timer
    assert timer is not None and timer.kind is TimerKind.RETRY
    assert timer.due_at - run.now == timedelta(seconds=1)  # backoff starts over
    assert run.history[-1].detail == "attempt 4/6: flaky; retry in 1.000s"
    run.fire()
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPLETED


def test_retry_of_a_timed_out_pivot_dispatches_it_again() -> None:
    run = Run(PIVOTED)
    run.succeed_through(1)
    run.fire()  # the pivot's deadline passes: unknown outcome, cannot be compensated
    assert run.state.status is SagaStatus.PARKED
    retry(run)
    assert run.sent()[-1] == cmd("pay", 2)
    assert run.state.steps["pay"].finished_at is None
    assert run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == cmd("ship", 1)


# -- retry now, during a backoff --------------------------------------------------------


def test_retry_during_a_step_backoff_dispatches_now() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.ERROR, error="db down")
    run.fire()
    run.reply(Outcome.ERROR, error="db down")
    assert run.state.timer is not None and run.state.timer.kind is TimerKind.RETRY
    retry(run)
    assert run.sent()[-1] == cmd("b", 3)
    assert run.state.timer == Timer(TimerKind.STEP_TIMEOUT, "b", 3, run.now + TIMEOUT)
    assert run.state.steps["b"].attempt_base == 2
    assert run.state.status is SagaStatus.RUNNING


def test_retry_during_a_compensation_backoff_dispatches_now() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    run.reply(Outcome.ERROR)
    assert run.state.timer is not None
    assert run.state.timer.kind is TimerKind.COMPENSATION_RETRY
    retry(run)
    assert run.sent()[-1] == comp("a", 2)
    assert run.state.status is SagaStatus.COMPENSATING


# -- retry refused --------------------------------------------------------------------


def test_retry_is_refused_where_it_means_nothing() -> None:
    run = Run()
    run.start()
    refused(run, "operator_retry", "is running", "command of step 'a' (attempt 1) is in flight")
    run.reply(Outcome.SUCCESS)
    run.reply(Outcome.FAILURE)
    refused(run, "operator_retry", "is compensating", "compensation of step 'a'")
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    refused(run, "operator_retry", "is compensated: there is nothing to retry")
    done = Run()
    done.succeed_through(3)
    refused(done, "operator_retry", "is completed")


# -- cancel ---------------------------------------------------------------------------


def test_cancel_compensates_the_step_in_flight_then_the_earlier_ones() -> None:
    run = Run()
    run.succeed_through(1)
    in_flight = run.last
    assert in_flight.step == "b"
    what = cancel(run)
    assert what == "compensating 'b', 'a'"
    assert run.state.status is SagaStatus.COMPENSATING
    assert run.state.error == "cancelled by alice: customer called"
    b = run.state.steps["b"]
    assert b.status is StepStatus.COMPENSATING
    assert b.error == "cancelled by alice with attempt 1 in flight: outcome unknown"
    assert run.sent()[-1] == comp("b")
    assert [(h.event, h.step, h.actor) for h in run.history[-3:]] == [
        ("cancelled", None, ALICE),
        ("step_cancelled", "b", "engine"),
        ("compensating", None, "engine"),
    ]
    assert run.history[-3].detail == "reason: customer called; compensating 'b', 'a'"
    # The action's reply arrives after all: too late, the saga no longer waits for it.
    assert run.reply(Outcome.SUCCESS, to=in_flight) is False
    assert run.reply(Outcome.SUCCESS)
    assert run.sent()[-1] == comp("a")
    assert run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert [s for e, s in run.events() if e == "step_compensated"] == ["b", "a"]
    assert run.statuses() == {
        "a": StepStatus.COMPENSATED,
        "b": StepStatus.COMPENSATED,
        "c": StepStatus.PENDING,
    }


def test_cancel_of_a_step_between_attempts_compensates_it_too() -> None:
    """An earlier attempt may still be delivered, so the step's outcome is unknown."""
    run = Run()
    run.start()
    run.reply(Outcome.ERROR, error="db down")
    assert run.state.steps["a"].status is StepStatus.PENDING
    cancel(run, reason=None)
    assert run.state.steps["a"].status is StepStatus.COMPENSATING
    assert run.state.timer == Timer(TimerKind.COMPENSATION_TIMEOUT, "a", 1, run.now + TIMEOUT)
    assert run.sent()[-1] == comp("a")
    assert run.history[0].event == "started"
    assert run.state.error == "cancelled by alice"
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED


def test_a_cancelled_step_whose_compensation_times_out_is_retried_then_parks() -> None:
    run = Run()
    run.succeed_through(1)
    cancel(run)
    for _ in range(COMP_RETRY.max_attempts - 1):
        run.fire()  # compensation timeout
        run.fire()  # compensation retry
    run.fire()
    assert run.state.status is SagaStatus.PARKED
    assert run.state.steps["b"].status is StepStatus.COMPENSATING
    retry(run)
    assert run.sent()[-1] == comp("b", 5)


def test_cancel_is_refused_where_it_means_nothing() -> None:
    run = Run()
    run.succeed_through(1)
    run.reply(Outcome.FAILURE)
    refused(run, "cancel", "is compensating: cannot cancel, it is already compensating")
    run.reply(Outcome.SUCCESS)
    refused(run, "cancel", "is compensated: cannot cancel, it has finished")
    done = Run()
    done.succeed_through(3)
    refused(done, "cancel", "is completed: cannot cancel")
    parked = Run()
    park_on_compensation(parked)
    refused(parked, "cancel", "is parked: cannot cancel, it is parked; retry it instead")


def test_a_saga_past_its_pivot_cannot_be_cancelled() -> None:
    run = Run(PIVOTED)
    run.succeed_through(1)
    refused(run, "cancel", "step 'pay' has no compensation", "has been dispatched")
    run.reply(Outcome.SUCCESS)
    refused(run, "cancel", "step 'pay' has no compensation", "has succeeded", "only go forward")


def test_cancel_of_the_first_step_in_flight() -> None:
    run = Run()
    run.start()
    assert cancel(run) == "compensating 'a'"
    assert run.sent() == [cmd("a"), comp("a")]
    run.reply(Outcome.SUCCESS)
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.state.steps["a"].status is StepStatus.COMPENSATED
    assert set(NAMES) == set(run.statuses())
