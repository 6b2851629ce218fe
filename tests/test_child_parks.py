"""A child saga that parks must not strand its parent (found by the graph property
test): the parent's step waits for the child's answer with no timeout, so a child
that parks without answering leaves its parent running forever, invisibly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from engine.definition import Child, Saga, Step
from engine.statemachine import child_id
from engine.states import SagaStatus
from sagas.order import OrderInput
from tests.helpers import EmbeddedSystem, fast_order_saga, order_input

ORDER = fast_order_saga()


def _pivot(name: str) -> Step:
    """The order's step ``name`` without its compensation."""
    step = ORDER.step(name)
    assert isinstance(step, Step)
    return replace(step, compensation=None)


#: The order with the charge as its pivot: a refused shipment parks it.
FORWARD = Saga(
    name="order_forward",
    version=1,
    input=OrderInput,
    steps=[
        ORDER.step("reserve_inventory"),
        _pivot("charge_payment"),
        _pivot("create_shipment"),
    ],
)
PARENT = Saga(
    name="order_parent",
    version=1,
    input=OrderInput,
    steps=[Child("order", saga=FORWARD, input=lambda ctx: ctx.input)],
)


async def test_a_child_that_parks_parks_its_parent_with_the_cause(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[PARENT]) as system:
        parent = await system.client.start("order_parent", order_input("create_shipment"))
        child = child_id(parent, "order", 1)
        parked = (await system.wait_all_terminal(10, [child]))[child]
        assert parked.status is SagaStatus.PARKED, parked.error
        detail = (await system.wait_all_terminal(5, [parent]))[parent]
        assert detail.status is SagaStatus.PARKED
        assert child in (detail.error or "")
        assert "create_shipment" in (detail.error or "")
