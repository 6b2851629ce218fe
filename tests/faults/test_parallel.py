"""A parallel group under crashes (issue 12): ``parallel_order`` reserves the stock and
charges the card at once, then ships (tests/faults/sagas.py).

The engine is killed after committing a reply it has not acknowledged (the reply
comes again: the inbox absorbs it), and the payment worker after committing a charge
it has not answered for (the command comes again: the barrier answers it). Both come
back. Every order ends as it must: shipped, or refused by the shipment and both
branches undone once each, the later-completed branch first; both branches of every
order went out in the same transition.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.faults.harness import Broker, scenario

pytestmark = pytest.mark.faults

BRANCHES = ("reserve_inventory", "charge_payment")


async def test_a_parallel_group_survives_engine_and_worker_crashes(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        engine = cluster.start_engine(crash="engine.after_commit:3")
        cluster.start_worker("inventory")
        cluster.start_worker("shipment")
        payment = cluster.start_worker("payment", crash="worker.after_commit:2")
        ids = await run.start_many(8, saga="parallel_order", fail_every=2)
        await cluster.crashed(engine, "engine.after_commit")
        await cluster.crashed(payment, "worker.after_commit")
        cluster.start_engine()
        cluster.start_worker("payment")
        details = await run.settle(timeout=120)
        await run.audit(details)

        for saga_id in ids:
            detail = details[saga_id]
            steps = {st.name: st for st in detail.steps}
            started = {steps[name].started_at for name in BRANCHES}
            assert len(started) == 1, (saga_id, started)  # dispatched together
            assert {steps[name].lane for name in BRANCHES} == {"prepare[1]", "prepare[2]"}
            if detail.status is SagaStatus.COMPENSATED:
                undone = [h.step for h in detail.history if h.event == "step_compensated"]
                by_completion = sorted(BRANCHES, key=lambda n: steps[n].completed or 0)
                assert undone == list(reversed(by_completion)), (saga_id, undone)
        assert {d.status for d in details.values()} == {
            SagaStatus.COMPLETED,
            SagaStatus.COMPENSATED,
        }
