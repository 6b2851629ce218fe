"""Timers are rows: the ones that fall due while the engine is down fire once after
it restarts (on either of two replicas), and a timer never acts on a finished saga.

``quick_order`` (tests/faults/sagas.py) times its steps out after a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.faults.harness import Broker, scenario
from tests.faults.sagas import QUICK_TIMEOUT

pytestmark = pytest.mark.faults


async def test_timers_due_while_the_engine_is_down_fire_once_after_restart(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        engine = cluster.start_engine()
        cluster.start_worker("inventory")
        payment = cluster.start_worker("payment")
        shipment = cluster.start_worker("shipment")
        await run.warm_up()
        # A saga that finished long before its step timeouts would have been due.
        finished = await run.start("quick_order")
        await run.wait_status(finished, SagaStatus.COMPLETED)
        finished_history = len((await run.client.get(finished)).history)

        # Three sagas wait for the shipment worker, which is gone...
        assert cluster.stop(shipment) == 0
        waiting = [await run.start("quick_order", expect=SagaStatus.COMPENSATED) for _ in range(3)]
        for saga_id in waiting:
            await run.wait_dispatched(saga_id, "create_shipment")
        # ...and one waits for the payment worker, which comes back while the engine
        # is down: its reply and its timeout are both due when the engine restarts.
        assert cluster.stop(payment) == 0
        racing = await run.start("quick_order")
        await run.wait_dispatched(racing, "charge_payment")

        cluster.kill(engine)
        cluster.start_worker("payment")
        # A worker's start and its group join take seconds on a busy machine.
        await run.wait_for(
            "the charge made while the engine is down",
            lambda: run.scalar(
                "SELECT count(*) FROM payment_ledger WHERE order_id = :id", id=racing
            ),
            60,
        )
        assert await run.scalar("SELECT count(*) FROM saga_timers"), "no timer to judge"

        async def all_due() -> bool:
            return not await run.scalar("SELECT count(*) FROM saga_timers WHERE due_at > now()")

        await run.wait_for("every timer to fall due", all_due, 3 * QUICK_TIMEOUT)

        restarted = time.monotonic()
        cluster.start_engine()
        cluster.start_engine()

        async def timed_out() -> bool:
            for saga_id in waiting:
                history = (await run.client.get(saga_id)).history
                if not any(h.event == "step_timed_out" for h in history):
                    return False
            return True

        # The shipment worker comes back only once the due timeouts fired: started
        # together with the engines, its replies could win the race (a reply applied
        # first is a completed saga, and then there is no timer left to judge).
        await run.wait_for("the due timeouts to fire after the restart", timed_out, 60)
        cluster.start_worker("shipment")
        details = await run.settle(timeout=90)
        print(f"settled {time.monotonic() - restarted:.1f}s after the restart")
        # The race may go either way; both ways must leave the books right.
        run.expected[racing] = details[racing].status
        await run.audit(details)  # at most one step_timed_out per saga: each fired once

        for saga_id in waiting:
            events = [(h.event, h.step) for h in details[saga_id].history]
            assert events.count(("step_timed_out", "create_shipment")) == 1, events
            # The shipment was created after all (the command was queued before its
            # compensation) and then cancelled; the late success reply was ignored.
            assert ("reply_ignored", "create_shipment") in events, events
        late = details[finished].history
        assert len(late) == finished_history and late[-1].event == "completed", late
        assert await run.scalar("SELECT count(*) FROM saga_timers") == 0
