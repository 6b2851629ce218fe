"""The graph core alone: parallel groups, waits, delays and local steps driven through
Transition on SagaState images, no database (see tests/test_statemachine.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from engine.definition import (
    Delay,
    Element,
    Local,
    Node,
    Parallel,
    RetryPolicy,
    Saga,
    StepContext,
    WaitFor,
)
from engine.errors import BusinessFailure, DefinitionError, OperationRefused
from engine.messages import Envelope, MessageKind, Outcome
from engine.model import Timer, TimerKind
from engine.states import SagaStatus, StepStatus
from tests.test_statemachine import COMP_RETRY, RETRY, TIMEOUT, Run, Trip, cmd, comp, step

UNLIMITED = RetryPolicy(max_attempts=None, initial_backoff=1, max_backoff=2, jitter=0)
WAIT = timedelta(seconds=60)


def saga(*elements: Element, name: str = "graph") -> Saga:
    return Saga(name=name, version=1, input=Trip, steps=list(elements))


def group(name: str, *branches: Sequence[Node], limit: int | None = None) -> Parallel:
    return Parallel(name, branches=[list(b) for b in branches], limit=limit)


class GraphRun(Run):
    """Run, plus replies to a given step, timers of a given step, and signals."""

    def command(self, name: str, kind: MessageKind = MessageKind.COMMAND) -> Envelope:
        """The latest message of ``kind`` sent for step ``name``."""
        found = [
            m.envelope for m in self.outbox if (m.envelope.step, m.envelope.kind) == (name, kind)
        ]
        assert found, f"nothing of kind {kind} sent for step {name!r}"
        return found[-1]

    def answer(self, name: str, outcome: Outcome = Outcome.SUCCESS, **kwargs: Any) -> bool:
        """Reply to the latest command of step ``name``."""
        return self.reply(outcome, to=self.command(name), **kwargs)

    def undo(self, name: str, outcome: Outcome = Outcome.SUCCESS) -> bool:
        """Reply to the latest compensation of step ``name``."""
        return self.reply(outcome, to=self.command(name, MessageKind.COMPENSATION))

    def timer_of(self, name: str) -> Timer:
        timer = self.state.steps[name].timer
        assert timer is not None, f"step {name!r} has no timer"
        return timer

    def signal(self, event: str, payload: dict[str, Any] | None = None) -> str:
        self.now += timedelta(seconds=1)
        tr = self.transition()
        try:
            return tr.on_signal(event, payload or {}, "ann")
        finally:
            self._keep(tr)

    def in_flight(self) -> set[str]:
        """Steps dispatched and unanswered (or between two attempts)."""
        return {
            st.name
            for st in self.state.steps.values()
            if st.status in (StepStatus.DISPATCHED, StepStatus.PENDING) and st.attempt > 0
        }

    def compensated(self) -> list[str | None]:
        return [s for e, s in self.events() if e == "step_compensated"]

    def completion_order(self) -> list[str]:
        done = [st for st in self.state.steps.values() if st.completed is not None]
        return [st.name for st in sorted(done, key=lambda st: st.completed or 0)]


def tally(record: list[str], name: str, result: dict[str, Any] | None = None) -> Any:
    """A local function that notes each call in ``record``."""

    def run(ctx: StepContext) -> dict[str, Any] | None:
        record.append(name)
        return result

    return run


def flaky(record: list[str], name: str, failures: int, error: type[Exception]) -> Any:
    """A local function that raises ``error`` its first ``failures`` calls."""

    def run(ctx: StepContext) -> dict[str, Any]:
        record.append(name)
        if record.count(name) <= failures:
            raise error(f"{name} not yet")
        return {"ran": name}

    return run


# -- parallel groups ------------------------------------------------------------------

FORK = saga(step("a"), group("g", [step("b")], [step("c1"), step("c2")]), step("d"))


def test_parallel_dispatches_branches_at_once_and_joins_before_the_next_step() -> None:
    run = GraphRun(FORK)
    run.start()
    assert run.answer("a")
    assert run.sent() == [cmd("a"), cmd("b"), cmd("c1")]
    assert {t.step for t in run.state.tokens()} == {"b", "c1"}
    assert {t.step for t in run.state.timers()} == {"b", "c1"}
    assert [run.state.steps[n].lane for n in ("a", "b", "c1", "c2", "d")] == [
        None,
        "g[1]",
        "g[2]",
        "g[2]",
        None,
    ]
    assert run.answer("c1", payload={"seat": 3})
    assert run.sent()[-1] == cmd("c2")  # the branch goes on without waiting for b
    assert run.command("c2").payload["seen"]["c1"] == {"seat": 3}
    assert run.answer("b")
    assert run.sent()[-1] == cmd("c2")  # the group is not done: d waits
    assert run.answer("c2")
    assert run.sent()[-1] == cmd("d")
    assert run.answer("d")
    assert run.state.status is SagaStatus.COMPLETED
    assert run.completion_order() == ["a", "c1", "b", "c2", "d"]
    assert run.state.tokens() == [] and run.state.timers() == []


def test_a_failing_branch_stops_the_others_and_compensates_in_reverse_completion() -> None:
    definition = saga(
        step("a"), group("g", [step("b")], [step("c")], [step("e1"), step("e2")]), step("d")
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    run.answer("e1")  # e2 is dispatched
    run.answer("b")
    assert run.in_flight() == {"c", "e2"}
    assert run.answer("c", Outcome.FAILURE, error="no room")
    st = run.state.steps
    assert st["c"].status is StepStatus.FAILED
    # e2's outcome is unknown: stopped, and being undone first (it completed last).
    assert st["e2"].status is StepStatus.COMPENSATING
    assert "stopped when step 'c' failed: no room" in (st["e2"].error or "")
    assert ("step_cancelled", "e2") in run.events()
    # One compensation at a time, latest completed first, then the steps before the group.
    for name in ("e2", "b", "e1", "a"):
        assert run.state.status is SagaStatus.COMPENSATING
        assert run.sent()[-1] == comp(name)
        assert [t.step for t in run.state.tokens()] == [name]
        assert run.undo(name)
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["e2", "b", "e1", "a"]
    assert st["c"].status is StepStatus.FAILED and st["d"].status is StepStatus.PENDING
    assert comp("c") not in run.sent() and cmd("d") not in run.sent()
    # The stopped branch's late reply changes nothing.
    assert not run.reply(Outcome.SUCCESS, to=run.command("e2"))
    assert run.state.status is SagaStatus.COMPENSATED


def test_a_timed_out_branch_is_compensated_after_the_branches_it_stopped() -> None:
    definition = saga(step("a"), group("g", [step("b")], [step("c")]))
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.fire(run.timer_of("b"))
    assert run.state.steps["b"].status is StepStatus.TIMED_OUT
    assert run.state.steps["c"].status is StepStatus.COMPENSATING  # stopped, then undone
    assert run.completion_order() == ["a", "b", "c"]
    for name in ("c", "b", "a"):
        assert run.sent()[-1] == comp(name)
        run.undo(name)
    assert run.state.status is SagaStatus.COMPENSATED


def test_the_limit_caps_branches_in_flight() -> None:
    definition = saga(
        group("g", [step("b1"), step("b2")], [step("c")], [step("e")], [step("f")], limit=2)
    )
    run = GraphRun(definition)
    run.start()
    assert run.sent() == [cmd("b1"), cmd("c")]
    assert run.answer("b1")  # b2 goes on in the same branch: still two in flight
    assert run.sent()[-1] == cmd("b2") and run.in_flight() == {"b2", "c"}
    assert run.answer("c")
    assert run.sent()[-1] == cmd("e") and run.in_flight() == {"b2", "e"}
    assert run.answer("e")
    assert run.sent()[-1] == cmd("f") and run.in_flight() == {"b2", "f"}
    assert run.answer("f")
    assert run.in_flight() == {"b2"}
    assert run.answer("b2")
    assert run.state.status is SagaStatus.COMPLETED


def test_the_limit_counts_a_branch_between_two_attempts() -> None:
    definition = saga(group("g", [step("b")], [step("c")], limit=1))
    run = GraphRun(definition)
    run.start()
    assert run.answer("b", Outcome.ERROR, error="flaky")
    assert run.in_flight() == {"b"}
    assert run.sent() == [cmd("b")]  # c does not start while b backs off
    assert run.fire(run.timer_of("b"))
    assert run.answer("b")
    assert run.sent() == [cmd("b"), cmd("b", 2), cmd("c")]


def test_a_failure_under_the_limit_leaves_the_branches_not_begun_alone() -> None:
    definition = saga(step("a"), group("g", [step("b")], [step("c")], [step("e")], limit=1))
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    run.answer("b")
    assert run.answer("c", Outcome.FAILURE, error="no")
    assert run.state.steps["e"].status is StepStatus.PENDING
    for name in ("b", "a"):
        assert run.sent()[-1] == comp(name)
        run.undo(name)
    assert run.state.status is SagaStatus.COMPENSATED
    assert cmd("e") not in run.sent()


# -- waiting for a signal ---------------------------------------------------------------

APPROVAL = saga(step("a"), WaitFor("approve", event="manager_ok", timeout=WAIT), step("b"))


def test_a_signal_completes_the_wait_and_its_payload_is_seen_later() -> None:
    run = GraphRun(APPROVAL)
    run.start()
    run.answer("a")
    assert run.timer_of("approve") == Timer(TimerKind.STEP_TIMEOUT, "approve", 1, run.now + WAIT)
    assert run.sent() == [cmd("a")]
    assert run.signal("manager_ok", {"by": "zoe"}) == "step 'approve' completed"
    assert run.state.steps["approve"].reply == {"by": "zoe"}
    assert run.command("b").payload["seen"]["approve"] == {"by": "zoe"}
    entry = next(h for h in run.history if h.event == "signal_received")
    assert (entry.step, entry.actor) == ("approve", "ann")
    with pytest.raises(OperationRefused, match="already had its signal"):
        run.signal("manager_ok")
    assert run.answer("b")
    assert run.state.status is SagaStatus.COMPLETED
    # Its timer was dropped with the signal: firing it now does nothing.
    assert not run.fire(Timer(TimerKind.STEP_TIMEOUT, "approve", 1, run.now + WAIT))


def test_a_signal_before_the_wait_is_reached_is_kept_for_it() -> None:
    run = GraphRun(APPROVAL)
    run.start()
    assert "kept for step 'approve'" in run.signal("manager_ok", {"by": "zoe"})
    assert run.state.steps["approve"].status is StepStatus.PENDING
    assert run.answer("a")
    assert run.state.steps["approve"].status is StepStatus.SUCCEEDED
    assert run.sent()[-1] == cmd("b")
    assert run.command("b").payload["seen"]["approve"] == {"by": "zoe"}
    with pytest.raises(OperationRefused):
        run.signal("manager_ok")


def test_a_signal_kept_for_a_step_before_it_is_not_seen_by_earlier_steps() -> None:
    run = GraphRun(APPROVAL)
    run.start()
    run.signal("manager_ok", {"by": "zoe"})
    run.answer("a", Outcome.FAILURE, error="no")
    assert run.state.status is SagaStatus.COMPENSATED
    assert "approve" not in run.command("a").payload["seen"]


def test_signals_that_mean_nothing_are_refused() -> None:
    run = GraphRun(APPROVAL)
    run.start()
    with pytest.raises(OperationRefused, match="waits for: manager_ok"):
        run.signal("approve")  # the step's name is not its event's
    run.answer("a", Outcome.FAILURE, error="no")
    with pytest.raises(OperationRefused, match="compensated"):
        run.signal("manager_ok")


def test_no_signal_within_the_timeout_fails_the_wait_and_compensates() -> None:
    run = GraphRun(APPROVAL)
    run.start()
    run.answer("a")
    assert run.fire(run.timer_of("approve"))
    assert run.state.steps["approve"].status is StepStatus.FAILED
    assert run.state.steps["approve"].error == "no signal 'manager_ok' within 60s"
    assert run.sent()[-1] == comp("a")
    run.undo("a")
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["a"]  # the wait itself has nothing to undo
    with pytest.raises(OperationRefused):
        run.signal("manager_ok")


def test_a_wait_in_a_group_is_stopped_when_a_branch_fails() -> None:
    definition = saga(step("a"), group("g", [WaitFor("approve", timeout=WAIT)], [step("b")]))
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.in_flight() == {"approve", "b"}
    run.answer("b", Outcome.FAILURE, error="no")
    assert run.state.steps["approve"].status is StepStatus.CANCELLED
    assert [t.step for t in run.state.timers()] == ["a"]  # only a's compensation timeout
    run.undo("a")
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["a"]


# -- durable delays ----------------------------------------------------------------------


def test_a_delay_is_a_timer_then_the_saga_goes_on() -> None:
    definition = saga(step("a"), Delay("cool", timedelta(seconds=5)), step("b"))
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.state.timers() == [Timer(TimerKind.DELAY, "cool", 1, run.now + timedelta(seconds=5))]
    assert run.sent() == [cmd("a")] and run.state.tokens() == []
    assert run.fire()
    assert run.state.steps["cool"].status is StepStatus.SUCCEEDED
    assert run.sent()[-1] == cmd("b")
    assert run.answer("b", Outcome.FAILURE, error="no")
    run.undo("a")
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["a"]  # a delay has nothing to undo
    assert run.state.steps["cool"].status is StepStatus.SUCCEEDED


# -- local steps ---------------------------------------------------------------------------


def test_a_local_step_runs_in_the_transition_and_its_result_is_seen_later() -> None:
    calls: list[str] = []
    definition = saga(step("a"), Local("price", run=tally(calls, "price", {"total": 3})), step("b"))
    run = GraphRun(definition)
    run.start()
    assert calls == []
    run.answer("a")
    assert calls == ["price"]
    assert run.state.steps["price"].status is StepStatus.SUCCEEDED
    assert run.command("b").payload["seen"]["price"] == {"total": 3}
    run.answer("b")
    assert run.state.status is SagaStatus.COMPLETED


def test_a_local_step_first_and_last() -> None:
    calls: list[str] = []
    definition = saga(
        Local("first", run=tally(calls, "first")), Local("last", run=tally(calls, "last"))
    )
    run = GraphRun(definition)
    run.start()
    assert calls == ["first", "last"]
    assert run.state.status is SagaStatus.COMPLETED
    assert run.state.steps["first"].reply == {}


def test_a_business_failure_of_a_local_step_compensates_the_steps_before_it() -> None:
    def refuse(ctx: StepContext) -> None:
        raise BusinessFailure("over budget")

    undone: list[str] = []
    definition = saga(
        step("a"),
        Local("note", run=tally([], "note"), compensation=tally(undone, "note")),
        Local("check", run=refuse, compensation=tally(undone, "check")),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.state.steps["check"].status is StepStatus.FAILED
    assert run.state.steps["check"].error == "over budget"
    assert undone == ["note"]  # run at once, in the same transition; the failed one is not
    assert run.sent()[-1] == comp("a")
    run.undo("a")
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["note", "a"]


def test_a_local_step_that_raises_is_retried_with_backoff() -> None:
    calls: list[str] = []
    definition = saga(Local("calc", run=flaky(calls, "calc", 2, RuntimeError), retry=RETRY))
    run = GraphRun(definition)
    run.start()
    assert run.state.steps["calc"].status is StepStatus.PENDING
    assert run.timer_of("calc") == Timer(TimerKind.RETRY, "calc", 1, run.now + timedelta(seconds=1))
    assert run.history[-1].event == "step_error"
    assert run.fire()
    assert run.fire()
    assert calls == ["calc"] * 3
    assert run.state.status is SagaStatus.COMPLETED
    assert run.state.steps["calc"].reply == {"ran": "calc"}


def test_a_local_step_out_of_retries_fails_and_is_not_compensated() -> None:
    calls: list[str] = []
    undone: list[str] = []
    definition = saga(
        step("a"),
        Local(
            "calc",
            run=flaky(calls, "calc", 99, RuntimeError),
            compensation=tally(undone, "calc"),
            retry=RETRY,
        ),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    run.fire()
    run.fire()
    assert calls == ["calc"] * 3
    assert run.state.steps["calc"].status is StepStatus.FAILED
    # Each attempt raised inside its transition: nothing of it remains to undo.
    assert undone == []
    assert run.sent()[-1] == comp("a")


def test_a_local_compensation_that_raises_is_retried() -> None:
    calls: list[str] = []
    definition = saga(
        Local(
            "note",
            run=tally([], "note"),
            compensation=flaky(calls, "undo", 1, RuntimeError),
            compensation_retry=COMP_RETRY,
        ),
        step("b"),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("b", Outcome.FAILURE, error="no")
    assert calls == ["undo"]
    assert run.timer_of("note").kind is TimerKind.COMPENSATION_RETRY
    assert run.fire()
    assert calls == ["undo", "undo"]
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["note"]


# -- after the pivot -----------------------------------------------------------------------

FORWARD = saga(
    step("a"),
    step("pay", compensated=False),
    step("ship", compensated=False, retry=UNLIMITED),
)


def test_after_the_pivot_unlimited_retries_go_on_until_success() -> None:
    run = GraphRun(FORWARD)
    run.succeed_through(2)
    for attempt in range(1, 13):
        assert run.last == run.command("ship") and run.last.attempt == attempt
        assert run.answer("ship", Outcome.ERROR, error="carrier down")
        assert run.state.status is SagaStatus.RUNNING
        assert "/unlimited" in (run.history[-1].detail or "")
        assert run.fire()
    assert run.answer("ship")
    assert run.state.status is SagaStatus.COMPLETED
    assert comp("a") not in run.sent()


def test_after_the_pivot_a_timeout_is_a_retried_attempt() -> None:
    run = GraphRun(FORWARD)
    run.succeed_through(2)
    for attempt in range(1, 6):
        assert run.command("ship").attempt == attempt
        assert run.fire(run.timer_of("ship"))  # the step timeout
        assert run.state.steps["ship"].status is StepStatus.PENDING
        assert run.timer_of("ship").kind is TimerKind.RETRY
        assert run.fire()  # the backoff
    assert [e for e, s in run.events() if s == "ship"].count("step_timed_out") == 5
    # A late reply to an earlier attempt is not taken; the current one is.
    assert not run.reply(Outcome.SUCCESS, to=run.outbox[-2].envelope)
    assert run.answer("ship")
    assert run.state.status is SagaStatus.COMPLETED
    assert comp("a") not in run.sent()


def test_after_the_pivot_limited_timeouts_park_with_the_real_cause() -> None:
    definition = saga(
        step("a"), step("pay", compensated=False), step("ship", compensated=False, retry=RETRY)
    )
    run = GraphRun(definition)
    run.succeed_through(2)
    for attempt in range(1, 4):
        assert run.fire(run.timer_of("ship"))
        if attempt < 3:
            assert run.fire()
    assert run.state.status is SagaStatus.PARKED
    assert run.state.error == (
        "step 'ship' failed after 3 attempts: no reply within 10s (attempt 3); "
        "step 'pay' is a pivot (succeeded) and cannot be compensated"
    )
    assert comp("a") not in run.sent()


def test_a_pivot_in_a_branch_parks_when_a_branch_beside_it_fails_after_it() -> None:
    definition = saga(
        step("a"),
        group("g", [step("pay", compensated=False)], [WaitFor("approve", timeout=WAIT)]),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    run.answer("pay")
    assert run.fire(run.timer_of("approve"))
    assert run.state.status is SagaStatus.PARKED
    assert (run.state.error or "").startswith("step 'approve' failed: no signal")
    assert "'pay' is a pivot (succeeded)" in (run.state.error or "")
    assert comp("a") not in run.sent()


def test_a_pivot_in_flight_when_its_branch_neighbour_fails_parks_the_saga() -> None:
    definition = saga(
        step("a"),
        group("g", [step("pay", compensated=False)], [WaitFor("approve", timeout=WAIT)]),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.fire(run.timer_of("approve"))
    assert run.state.steps["pay"].status is StepStatus.CANCELLED
    assert run.state.status is SagaStatus.PARKED
    assert "'pay' is a pivot (cancelled)" in (run.state.error or "")
    assert comp("a") not in run.sent()


def test_a_pivot_not_yet_begun_under_the_limit_lets_the_saga_compensate() -> None:
    definition = saga(
        step("a"),
        group("g", [WaitFor("approve", timeout=WAIT)], [step("pay", compensated=False)], limit=1),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    assert run.fire(run.timer_of("approve"))
    assert run.sent()[-1] == comp("a")
    run.undo("a")
    assert run.state.status is SagaStatus.COMPENSATED
    assert cmd("pay") not in run.sent()


# -- validation -----------------------------------------------------------------------------


def _refused(build: Callable[[], object], match: str) -> None:
    with pytest.raises(DefinitionError, match=match):
        build()


def test_groups_do_not_nest() -> None:
    _refused(
        lambda: saga(group("g", [step("a")], [Parallel("h", branches=[[step("b")]])])),  # type: ignore[list-item]
        "do not nest",
    )


def test_a_compensable_branch_beside_a_pivot_is_refused() -> None:
    _refused(
        lambda: saga(group("g", [step("pay", compensated=False)], [step("b")])),
        "step 'b': cannot have a compensation, its branch runs beside the pivot step 'pay'",
    )
    _refused(
        lambda: saga(
            group(
                "g",
                [step("pay", compensated=False)],
                [Local("note", run=tally([], "n"), compensation=tally([], "n"))],
            )
        ),
        "step 'note': cannot have a compensation, its branch runs beside",
    )
    # Beside a pivot: nothing to undo is fine, and so is a compensable step before it.
    saga(
        step("a"),
        group("g", [step("b"), step("pay", compensated=False)], [WaitFor("w"), Delay("d", WAIT)]),
    )


def test_a_compensation_after_a_pivot_in_a_group_is_refused() -> None:
    _refused(
        lambda: saga(group("g", [step("pay", compensated=False)], [WaitFor("w")]), step("b")),
        "step 'b': cannot have a compensation, it comes after the pivot step 'pay'",
    )
    _refused(
        lambda: saga(
            step("pay", compensated=False),
            Local("n", run=tally([], "n"), compensation=tally([], "n")),
        ),
        "step 'n': cannot have a compensation, it comes after the pivot",
    )


@pytest.mark.parametrize(
    "elements",
    [
        pytest.param(lambda: [group("g", [step("a")], [step("a")])], id="two branches"),
        pytest.param(lambda: [step("a"), group("g", [step("b")], [WaitFor("a")])], id="before"),
        pytest.param(
            lambda: [group("g", [step("b")], [Delay("c", WAIT)]), Local("b", run=tally([], "b"))],
            id="after",
        ),
        pytest.param(lambda: [step("g"), group("g", [step("b")])], id="group name"),
    ],
)
def test_duplicate_names_across_branches_are_refused(elements: Callable[[], list[Element]]) -> None:
    _refused(lambda: saga(*elements()), "duplicate step name")


def test_empty_groups_and_bad_limits_are_refused() -> None:
    _refused(lambda: saga(group("g")), "at least one branch")
    _refused(lambda: saga(group("g", [step("a")], [])), "no empty branch")
    _refused(lambda: saga(group("g", [step("a")], limit=0)), "limit must be at least 1")


def test_the_same_command_name_in_two_branches_is_refused() -> None:
    _refused(
        lambda: saga(group("g", [step("a")], [step("b", command_name="a")])),
        "both use the command name 'a'",
    )


def test_forward_only_and_lanes_follow_the_pivot_through_groups() -> None:
    definition = saga(
        step("a"),
        group("g", [step("b"), step("pay", compensated=False), WaitFor("w")], [Delay("d", WAIT)]),
        step("ship", compensated=False),
    )
    assert [n.name for n in definition.nodes] == ["a", "b", "pay", "w", "d", "ship"]
    assert {n: definition.forward_only(n) for n in ("a", "b", "pay", "w", "d", "ship")} == {
        "a": False,
        "b": False,
        "pay": False,
        "w": True,
        "d": False,
        "ship": True,
    }
    assert definition.lane("w") == "g[1]" and definition.lane("d") == "g[2]"
    assert definition.lane("a") is None
    assert [s.group for s in definition.stages] == [None, "g", None]


def test_compensation_timeout_of_a_branch_step_uses_its_own_timeout() -> None:
    definition = saga(group("g", [step("b", timeout=TIMEOUT * 2)], [step("c")]))
    run = GraphRun(definition)
    run.start()
    run.answer("b")
    run.answer("c", Outcome.FAILURE, error="no")
    assert run.timer_of("b") == Timer(TimerKind.COMPENSATION_TIMEOUT, "b", 1, run.now + TIMEOUT * 2)


# -- operators on graph sagas ----------------------------------------------------------------


def test_cancel_stops_the_branches_in_flight_and_undoes_everything_in_reverse() -> None:
    run = GraphRun(FORK)
    run.start()
    run.answer("a")
    run.answer("c1")  # c2 dispatched; b still in flight
    tr = run.transition()
    what = tr.cancel("ann", "changed my mind")
    run._keep(tr)
    assert what == "compensating 'c2', 'b', 'c1', 'a'"
    assert {run.state.steps[n].status for n in ("b", "c2")} <= {
        StepStatus.CANCELLED,
        StepStatus.COMPENSATING,
    }
    for name in ("c2", "b", "c1", "a"):
        assert run.sent()[-1] == comp(name)
        run.undo(name)
    assert run.state.status is SagaStatus.COMPENSATED
    assert run.compensated() == ["c2", "b", "c1", "a"]


def test_retrying_a_saga_parked_beside_its_pivot_resumes_both_branches() -> None:
    definition = saga(
        step("a"),
        group("g", [step("pay", compensated=False)], [WaitFor("approve", timeout=WAIT)]),
    )
    run = GraphRun(definition)
    run.start()
    run.answer("a")
    run.fire(run.timer_of("approve"))
    assert run.state.status is SagaStatus.PARKED
    tr = run.transition()
    tr.operator_retry("ann")
    run._keep(tr)
    assert run.state.status is SagaStatus.RUNNING
    assert run.sent()[-1] == cmd("pay", 2)
    assert run.timer_of("approve").kind is TimerKind.STEP_TIMEOUT
    assert run.signal("approve") == "step 'approve' completed"
    assert not run.reply(Outcome.SUCCESS, to=run.outbox[1].envelope)  # pay's attempt 1
    assert run.answer("pay")
    assert run.state.status is SagaStatus.COMPLETED
    assert comp("a") not in run.sent()
