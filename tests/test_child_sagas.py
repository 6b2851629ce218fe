"""Child sagas (issue 12): a saga started as a step of another. Its outcome is the
step's outcome; compensating the step compensates the child. Parent and child talk
through the engine's own deferred-reply rows, written with each change, no broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from engine.definition import Child, Delay, Local, Saga, Step, is_pivot, undoes
from engine.errors import BusinessFailure
from engine.statemachine import child_id
from engine.states import SagaStatus, StepStatus
from sagas.order import OrderInput
from tests.helpers import EmbeddedSystem, fast_order_saga, history_events, order_input

ORDER = fast_order_saga()
#: The order saga's two undoable steps: a child its parent can compensate.
PART = Saga(
    name="order_part",
    version=1,
    input=OrderInput,
    steps=[ORDER.step("reserve_inventory"), ORDER.step("charge_payment")],
)


def _check(ctx: object) -> dict[str, str]:
    if ctx.input.address == "nowhere":  # type: ignore[attr-defined]
        raise BusinessFailure("the parent refuses this address")
    return {"checked": "yes"}


BUNDLE = Saga(
    name="bundle",
    version=1,
    input=OrderInput,
    steps=[Child("part", saga=PART, input=lambda ctx: ctx.input), Local("check", run=_check)],
)


async def test_a_child_that_completes_completes_its_step(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[BUNDLE]) as system:
        parent = await system.client.start("bundle", order_input())
        detail = (await system.wait_all_terminal(10, [parent]))[parent]
        assert detail.status is SagaStatus.COMPLETED, detail.error
        child = child_id(parent, "part", 1)
        part = detail.steps[0]
        assert part.reply is not None and part.reply["saga_id"] == child
        assert set(part.reply["replies"]) == {"reserve_inventory", "charge_payment"}
        assert (await system.client.get(child)).status is SagaStatus.COMPLETED
        effect = (await system.effects())[child]
        assert (effect.reserved, effect.charges, effect.refunds) == (2, 1, 0)


async def test_compensating_the_parent_compensates_a_completed_child(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[BUNDLE]) as system:
        parent = await system.client.start("bundle", order_input(address="nowhere"))
        detail = (await system.wait_all_terminal(10, [parent]))[parent]
        assert detail.status is SagaStatus.COMPENSATED, detail.error
        assert history_events(detail, "step_compensated") == ["part"]
        child = await system.client.get(child_id(parent, "part", 1))
        assert child.status is SagaStatus.COMPENSATED
        assert history_events(child, "compensation_requested") == [None]
        assert history_events(child, "step_compensated") == ["charge_payment", "reserve_inventory"]
        effect = (await system.effects())[child.id]
        assert (effect.reserved, effect.net_charged_cents, effect.refunds) == (0, 0, 1)


async def test_a_child_that_fails_fails_its_step_naming_it(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[BUNDLE]) as system:
        parent = await system.client.start("bundle", order_input("charge_payment"))
        detail = (await system.wait_all_terminal(10, [parent]))[parent]
        assert detail.status is SagaStatus.COMPENSATED
        child = child_id(parent, "part", 1)
        assert detail.steps[0].status is StepStatus.FAILED
        assert detail.error is not None and f"child saga {child}" in detail.error
        # Failed, the step is not compensated: the child undid itself already.
        assert history_events(detail, "step_compensated") == []
        assert (await system.client.get(child)).status is SagaStatus.COMPENSATED
        effect = (await system.effects()).get(child)
        assert effect is None or (effect.reserved, effect.net_charged_cents) == (0, 0)


def test_a_child_with_nothing_to_undo_may_follow_the_pivot() -> None:
    pause = Saga(name="pause", version=1, input=OrderInput, steps=[Delay("d", timedelta(0))])
    pay = ORDER.step("charge_payment")
    assert isinstance(pay, Step)
    saga = Saga(
        name="pay_then_pause",
        version=1,
        input=OrderInput,
        steps=[
            replace(pay, compensation=None),
            Child("later", saga=pause, input=lambda ctx: ctx.input),
        ],
    )
    later = saga.step("later")
    assert not undoes(later) and not is_pivot(later)
    assert undoes(BUNDLE.step("part"))
