"""Local steps (issue 12) run in the transition that advances their saga: an attempt
that raised was rolled back with it, so a local step stopped between its attempts
did not run and is not compensated."""

from __future__ import annotations

from engine.definition import Local, Parallel, RetryPolicy, Saga, StepContext
from engine.messages import Outcome
from engine.states import SagaStatus, StepStatus
from tests.test_statemachine import TRIP, Run, step


def test_a_local_step_stopped_in_its_retry_backoff_is_not_compensated() -> None:
    calls: list[str] = []

    def flaky(ctx: StepContext) -> None:
        calls.append("run")
        raise RuntimeError("hiccup")  # rolled back: no effect

    def undo(ctx: StepContext) -> None:
        calls.append("undo")

    local = Local("l", flaky, compensation=undo, retry=RetryPolicy(max_attempts=5))
    saga = Saga(
        name="stopped_local",
        version=1,
        input=TRIP.input,
        steps=[Parallel("g", [[local], [step("s")]])],
    )
    run = Run(saga)
    run.start()
    assert run.statuses()["l"] is StepStatus.PENDING
    run.reply(Outcome.FAILURE, error="refused")
    assert run.state.status is SagaStatus.COMPENSATED
    assert calls == ["run"]
