"""Workers killed after their business effect, before acknowledging the command.

* ``worker.after_commit``: the effect committed, no reply was sent. The command is
  redelivered; the barrier finds its row and sends the stored reply: one effect.
* ``worker.after_reply``: the reply went out, the ack did not. The command is
  redelivered and answered again from the barrier; the saga ignores the repeat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import Broker, scenario

pytestmark = pytest.mark.faults


async def test_worker_killed_after_its_effect_is_redelivered_and_acts_once(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        cluster.start_worker("shipment")
        inventory = cluster.start_worker("inventory", crash="worker.after_reply:2")
        payment = cluster.start_worker("payment", crash="worker.after_commit:2")
        # patient_order: restarting the killed workers, and Kafka handing their
        # partitions over once the dead members' sessions expire, may take longer on a
        # busy machine than place_order's step timeout; timeouts are not the point here.
        ids = await run.start_many(6, saga="patient_order", fail_every=3)
        await cluster.crashed(inventory, "worker.after_reply")
        await cluster.crashed(payment, "worker.after_commit")
        # The payment worker died holding a committed charge it never answered for.
        charged = await run.rows("SELECT order_id FROM payment_ledger WHERE kind = 'charge'")
        # At least the two commits the crash point counted; more when a batch of
        # commands shared a transaction (each is counted after the one commit).
        assert len(charged) >= 2, charged

        cluster.start_worker("inventory")
        cluster.start_worker("payment")
        details = await run.settle(timeout=90)
        await run.audit(details)

        ignored = [
            (saga_id, h.step)
            for saga_id in ids
            for h in details[saga_id].history
            if h.event == "reply_ignored"
        ]
        # Only replies that went out before the crash came twice: the crashed
        # inventory worker's (one, or the rest of its batch, which is replied to before
        # any of it is acknowledged), each once.
        assert ignored and {step for _, step in ignored} == {"reserve_inventory"}, ignored
        assert len({saga_id for saga_id, _ in ignored}) == len(ignored), ignored
        for detail in details.values():
            for step in detail.steps:
                assert step.attempts <= 1 and step.compensation_attempts <= 1, step
