"""A child saga that parks does not strand its parent (found by the graph property
test): the parent's step has no timeout and waits for the child's outcome, so the
parked child tells it why; the parent shows it (its error and history name the child
and the cause) and goes on once an operator's retry lets the child finish."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.definition import Child, Parallel, Saga, Step, WaitFor
from engine.errors import OperationRefused
from engine.messages import MessageKind
from engine.statemachine import child_id
from engine.states import SagaStatus
from engine.worker.worker import Registration, Worker
from sagas.order import OrderInput
from tests.helpers import (
    EXAMPLE_WORKERS,
    FAST_RETRY,
    EmbeddedSystem,
    fast_order_saga,
    order_input,
)

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
#: A child that finishes when told (signal "go"): nothing to undo.
WAITER = Saga(name="waiter", version=1, input=OrderInput, steps=[WaitFor("go")])
#: Both children side by side: one parks, the other finishes meanwhile.
SIDE_BY_SIDE = Saga(
    name="order_pair",
    version=1,
    input=OrderInput,
    steps=[
        Parallel(
            "both",
            branches=[
                [Child("order", saga=FORWARD, input=lambda ctx: ctx.input)],
                [Child("wait", saga=WAITER, input=lambda ctx: ctx.input)],
            ],
        )
    ],
)


def failing_first(times: int) -> Worker:
    """The shipment worker, raising on each saga's first ``times`` shipments (a
    transient error, rolled back: a later attempt runs afresh)."""
    original = EXAMPLE_WORKERS["shipment"]
    worker = Worker(original.name)
    worker.handlers.update(original.handlers)
    key = (MessageKind.COMMAND, "create_shipment")
    ship = worker.handlers[key]
    calls: Counter[str] = Counter()

    async def handler(command: Any, context: Any) -> Any:
        calls[context.saga_id] += 1
        if calls[context.saga_id] <= times:
            raise RuntimeError("the depot is closed")
        return await ship.handler(command, context)

    worker.handlers[key] = Registration(ship.name, ship.kind, ship.model, handler)
    return worker


async def test_a_parked_child_keeps_its_parent_waiting_visibly_until_it_finishes(
    tmp_path: Path,
) -> None:
    # Out of attempts past its pivot, the child parks.
    workers = {**EXAMPLE_WORKERS, "shipment": failing_first(FAST_RETRY.max_attempts or 0)}
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[PARENT], workers=workers) as system:
        parent = await system.client.start("order_parent", order_input())
        child = child_id(parent, "order", 1)
        parked = (await system.wait_all_terminal(10, [child]))[child]
        assert parked.status is SagaStatus.PARKED, parked.error

        def told(detail: Any) -> bool:
            return any(h.event == "child_parked" for h in detail.history)

        detail = await system.wait_status(parent, told, 10, "the parent to hear of it")
        assert detail.status is SagaStatus.RUNNING
        assert child in (detail.error or "") and "the depot is closed" in (detail.error or "")
        with pytest.raises(OperationRefused, match=f"waits for its child saga {child}"):
            await system.client.retry(parent, actor="ops")

        await system.client.retry(child, actor="ops")  # the depot opened again
        done = (await system.wait_all_terminal(10, [parent]))[parent]
        assert done.status is SagaStatus.COMPLETED, done.error
        assert done.error is None
        assert (await system.client.get(child)).status is SagaStatus.COMPLETED
        assert (await system.effects())[child].shipped


async def test_a_sibling_child_finishing_leaves_the_parked_one_named(tmp_path: Path) -> None:
    """Found by the graph property test on a busy machine: the other child's outcome
    cleared the parent's error, though the first child was still parked."""
    workers = {**EXAMPLE_WORKERS, "shipment": failing_first(FAST_RETRY.max_attempts or 0)}
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[SIDE_BY_SIDE], workers=workers) as system:
        parent = await system.client.start("order_pair", order_input())
        parked, waiter = child_id(parent, "order", 1), child_id(parent, "wait", 1)
        await system.wait_status(
            parent,
            lambda d: any(h.event == "child_parked" for h in d.history),
            10,
            "the parent to hear its child parked",
        )
        await system.client.signal(waiter, "go")
        detail = await system.wait_status(
            parent,
            lambda d: any(s.name == "wait" and s.status.value == "succeeded" for s in d.steps),
            10,
            "the other child to finish",
        )
        assert detail.status is SagaStatus.RUNNING
        assert parked in (detail.error or ""), detail.error
        assert "the depot is closed" in (detail.error or ""), detail.error

        await system.client.retry(parked, actor="ops")
        done = (await system.wait_all_terminal(10, [parent]))[parent]
        assert done.status is SagaStatus.COMPLETED, done.error
        assert done.error is None
