"""Operator repair against a running system: engine and example workers on SQLite and
the in-memory broker, judged by the participants' ledgers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.definition import RetryPolicy, Saga
from engine.states import SagaStatus, StepStatus
from engine.views import SagaDetail
from engine.worker.worker import Registration, Worker
from sagas.order import place_order
from tests.helpers import (
    EXAMPLE_WORKERS,
    FAST_RETRY,
    QUANTITY,
    EmbeddedSystem,
    assert_books_balance,
    history_events,
)
from workers import inventory

#: Three quick compensation attempts, then the saga parks.
SHORT_COMPENSATION = RetryPolicy(max_attempts=3, initial_backoff=0.02, max_backoff=0.05, jitter=0)


def short_saga() -> Saga:
    return Saga(
        name=place_order.name,
        version=place_order.version,
        input=place_order.input,
        steps=[
            replace(s, retry=FAST_RETRY, compensation_retry=SHORT_COMPENSATION)
            for s in place_order.steps
        ],
    )


class Breakable:
    """A copy of a worker whose handler ``name`` raises while ``broken`` is set."""

    def __init__(self, worker: Worker, name: str) -> None:
        self.broken = True
        self.calls = 0
        self.worker = Worker(worker.name)
        for key, reg in worker.handlers.items():
            self.worker.handlers[key] = self._wrap(reg) if reg.name == name else reg

    def _wrap(self, reg: Registration) -> Registration:
        async def handler(command: Any, context: Any) -> Any:
            self.calls += 1
            if self.broken:
                raise RuntimeError(f"{reg.name} is broken")
            return await reg.handler(command, context)

        return Registration(reg.name, reg.kind, reg.model, handler)


async def test_operator_retry_completes_a_saga_parked_by_a_failing_compensation(
    tmp_path: Path,
) -> None:
    release = Breakable(inventory.worker, "release_inventory")
    workers = {**EXAMPLE_WORKERS, "inventory": release.worker}
    async with EmbeddedSystem(tmp_path / "retry.db", sagas=[short_saga()], workers=workers) as sys:
        saga_id = await sys.start_order("charge_payment")  # reserve, then the charge fails
        parked = await sys.wait_status(
            saga_id, lambda d: d.status is SagaStatus.PARKED, 10, "the saga to park"
        )
        assert release.calls == 3
        assert "compensation of step 'reserve_inventory' failed 3 times" in (parked.error or "")
        assert (await sys.effects())[saga_id].reserved == QUANTITY  # not undone yet

        release.broken = False  # the participant is repaired
        result = await sys.client.retry(saga_id, actor="alice", reason="inventory fixed")
        assert result.status is SagaStatus.COMPENSATING
        assert [d.attempt for d in result.dispatched] == [4]
        final = await sys.wait_status(
            saga_id, lambda d: d.status is SagaStatus.COMPENSATED, 10, "the compensation"
        )
        assert release.calls == 4
        assert_books_balance(final, await sys.effects())
        retried = [h for h in final.history if h.event == "retried"]
        assert [(h.actor, h.step) for h in retried] == [("alice", "reserve_inventory")]
        assert (retried[0].detail or "").startswith("reason: inventory fixed; ")
        assert history_events(final, "step_compensated") == ["reserve_inventory"]
        totals = await sys.totals()
        assert totals.stock_conserved and totals.money_conserved


async def test_operator_cancel_undoes_the_step_in_flight_and_the_books_balance(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(
        tmp_path / "cancel.db", run_workers=["inventory", "shipment"]
    ) as system:
        saga_id = await system.start_order()

        def charging(d: SagaDetail) -> bool:
            return any(s.name == "charge_payment" and s.attempts == 1 for s in d.steps)

        await system.wait_status(saga_id, charging, 10, "the charge to be dispatched")
        result = await system.client.cancel(saga_id, actor="bob", reason="fraud suspected")
        assert result.summary == "compensating 'charge_payment', 'reserve_inventory'"
        # Only now does the payment participant run: it sees the charge, then the refund.
        await system.start_worker("payment")
        final = await system.wait_status(
            saga_id, lambda d: d.status.is_terminal, 10, "the cancelled saga to settle"
        )
        assert final.status is SagaStatus.COMPENSATED
        assert final.error == "cancelled by bob: fraud suspected"
        steps = {s.name: s.status for s in final.steps}
        assert steps == {
            "reserve_inventory": StepStatus.COMPENSATED,
            "charge_payment": StepStatus.COMPENSATED,
            "create_shipment": StepStatus.PENDING,
        }
        assert history_events(final, "step_compensated") == [
            "charge_payment",
            "reserve_inventory",
        ]
        effect = (await system.effects()).get(saga_id)
        assert effect is not None
        assert (effect.reserved, effect.net_charged_cents, effect.shipped) == (0, 0, False)
        assert effect.charges == effect.refunds <= 1
        totals = await system.totals()
        assert totals.stock_conserved and totals.money_conserved
        assert totals.charged_cents - totals.refunded_cents == 0
