"""The example's large order (sagas/large_order.py) on the embedded runner: a parallel
group, a manager's approval by signal, a local check, a durable cooling-off.

Approved, it completes; rejected (the signal sent before the saga got to its wait)
or never decided, it compensates both branches in reverse order of completion; the
participants' books balance either way. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.definition import StepContext
from engine.errors import BusinessFailure, OperationRefused
from engine.states import SagaStatus, StepStatus
from engine.views import SagaDetail, StepView
from sagas.large_order import Approval, check_approval, large_order
from sagas.order import OrderInput
from tests.e2e import fresh_database, service_url
from tests.helpers import PRICE, QUANTITY, EmbeddedSystem, fast_large_order_saga, order_input

#: Seconds the saga waits for the manager: long enough for the test to answer the one
#: it approves on a busy machine, short enough that the silent one times out quickly.
APPROVAL_TIMEOUT = 2.5


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A temp SQLite file, then a fresh PostgreSQL database (migrated by the system)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'large.db'}"
        return
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        yield url


def step(detail: SagaDetail, name: str) -> StepView:
    return next(s for s in detail.steps if s.name == name)


def compensations(detail: SagaDetail) -> list[str | None]:
    return [h.step for h in detail.history if h.event == "step_compensated"]


def latest_completed_first(detail: SagaDetail, *names: str) -> list[str]:
    def completed(name: str) -> int:
        order = step(detail, name).completed
        assert order is not None, f"{name} never completed"
        return order

    return sorted(names, key=completed, reverse=True)


async def test_approved_rejected_and_timed_out(database_url: str, tmp_path: Path) -> None:
    async with EmbeddedSystem(
        tmp_path / "unused.db",
        database_url=database_url,
        sagas=[fast_large_order_saga(approval_timeout=APPROVAL_TIMEOUT)],
        run_workers=["payment", "shipment"],
    ) as system:
        client = system.client
        approved = await client.start("large_order", order_input())
        rejected = await client.start("large_order", order_input())
        silent = await client.start("large_order", order_input())

        # No inventory worker yet: no saga can be at its approval, so this one is kept.
        kept = await client.signal(
            rejected,
            "manager_approval",
            Approval(approved=False, by="dana", reason="over budget"),
            actor="dana",
        )
        assert kept.summary == (
            "kept for step 'manager_approval', which the saga has not reached yet"
        )
        # The charges complete first, the reservations once inventory runs.
        for saga_id in (approved, rejected, silent):
            await system.wait_status(
                saga_id,
                lambda d: step(d, "charge_payment").status is StepStatus.SUCCEEDED,
                20,
                "the charge",
            )
        await system.start_worker("inventory")

        waiting = await system.wait_status(
            approved,
            lambda d: step(d, "manager_approval").status is StepStatus.DISPATCHED,
            20,
            "the approved order to wait for its approval",
        )
        assert waiting.status is SagaStatus.RUNNING
        done = await client.signal(approved, "manager_approval", {"approved": True, "by": "dana"})
        assert done.summary == "step 'manager_approval' completed"

        details = await system.wait_all_terminal(30, [approved, rejected, silent])
        books = await system.effects()
        totals = await system.totals()

        with pytest.raises(OperationRefused, match="is completed: it takes no signal now"):
            await client.signal(approved, "manager_approval", {"approved": True})

    ok = details[approved]
    assert ok.status is SagaStatus.COMPLETED, ok.error
    assert step(ok, "check_approval").reply == {"approved_by": "dana"}
    assert [s.lane for s in ok.steps[:2]] == ["prepare[1]", "prepare[2]"]
    assert {s.status for s in ok.steps} == {StepStatus.SUCCEEDED}
    assert books[approved].shipped
    assert books[approved].reserved == QUANTITY
    assert books[approved].net_charged_cents == PRICE

    no = details[rejected]
    assert no.status is SagaStatus.COMPENSATED
    assert no.error == "step 'check_approval' failed: rejected by dana: over budget"
    assert step(no, "check_approval").status is StepStatus.FAILED
    assert step(no, "cooling_off").attempts == 0
    assert step(no, "create_shipment").attempts == 0
    # The charge completed before the reservation: undone after it.
    assert compensations(no) == ["reserve_inventory", "charge_payment"]

    late = details[silent]
    assert late.status is SagaStatus.COMPENSATED
    assert late.error == (
        f"step 'manager_approval' failed: no signal 'manager_approval' within {APPROVAL_TIMEOUT:g}s"
    )
    assert compensations(late) == latest_completed_first(
        late, "reserve_inventory", "charge_payment"
    )

    for saga_id in (rejected, silent):
        effect = books[saga_id]
        assert (effect.reserved, effect.net_charged_cents, effect.shipped) == (0, 0, False)
        assert effect.charges == effect.refunds == 1
    assert totals.stock_conserved
    assert totals.money_conserved
    assert totals.shipments_created == 1


def _context(approval: dict[str, object]) -> StepContext:
    order = OrderInput.model_validate(order_input())
    return StepContext("s-1", order, {"manager_approval": approval})


def test_check_approval_fails_the_step_on_a_rejection_or_no_decision() -> None:
    approved = check_approval(_context({"approved": True, "by": "erin"}))
    assert approved.approved_by == "erin"
    with pytest.raises(BusinessFailure, match=r"^rejected by the manager$"):
        check_approval(_context({"approved": False}))
    with pytest.raises(BusinessFailure, match="the approval is not a decision"):
        check_approval(_context({"approve": "yes please"}))


def test_large_order_shape() -> None:
    assert [stage.group for stage in large_order.stages] == ["prepare", None, None, None, None]
    assert large_order.stages[0].branches == (("reserve_inventory",), ("charge_payment",))
    assert [w.name for w in large_order.waits_for("manager_approval")] == ["manager_approval"]
    # No pivot: every step can still be undone, so none is forward-only.
    assert not any(large_order.forward_only(n.name) for n in large_order.nodes)
