"""Unknown outcomes: a step whose reply never comes times out and is compensated.

``quick_order`` (tests/faults/sagas.py) times its steps out after 4 seconds.

* The reply is lost: the payment worker charged and was killed before replying
  (``worker.after_commit``), and comes back only after the timeout. The charge step
  is compensated like a completed one: the charge is refunded, the late success
  reply is ignored.
* The command is lost: the inventory worker never saw the reserve command. The
  timeout compensates it anyway; the barrier turns that release into a no-op, and
  when the lost command finally arrives it is refused: nothing is reserved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.messages import encode
from engine.states import SagaStatus
from engine.views import HistoryView
from tests.faults.harness import Broker, scenario

pytestmark = pytest.mark.faults


async def test_lost_reply_and_lost_command_time_out_and_are_compensated(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        for name in ("inventory", "shipment"):
            cluster.start_worker(name)
        payment = cluster.start_worker("payment", crash="worker.after_commit:2")
        await run.warm_up()
        lost_reply = await run.start("quick_order", expect=SagaStatus.COMPENSATED)
        lost_command, command = await run.start_lost("quick_order")

        # The lost command: compensated without ever running, then refused when late.
        await run.wait_status(lost_command, SagaStatus.COMPENSATED)
        await run.publish(command.destination, lost_command, encode(command.envelope))

        # The lost reply: the charge committed, its worker died before replying.
        await cluster.crashed(payment, "worker.after_commit")
        await run.wait_step(lost_reply, "step_timed_out", "charge_payment")
        cluster.start_worker("payment")

        def refusal(h: HistoryView) -> bool:
            # The barrier refuses with a business failure, which the finished saga ignores.
            return h.event == "reply_ignored" and "command attempt 1 (failure)" in (h.detail or "")

        async def refused() -> bool:
            return any(refusal(h) for h in (await run.client.get(lost_command)).history)

        await run.wait_for("the late reserve command to be refused", refused, 30)
        details = await run.settle(timeout=60)
        await run.audit(details)

        late = [(h.event, h.step) for h in details[lost_command].history]
        assert late[:3] == [
            ("started", None),
            ("step_timed_out", "reserve_inventory"),
            ("compensating", None),
        ], late
        assert late.count(("step_compensated", "reserve_inventory")) == 1, late
        assert ("compensated", None) in late, late
        assert any(refusal(h) for h in details[lost_command].history), late
        barrier = {
            (r.op, r.origin, r.outcome)
            for r in await run.rows(
                "SELECT op, origin, outcome FROM participant_barrier WHERE saga_id = :id",
                id=lost_command,
            )
        }
        # The release wrote the action's row itself (null compensation), which is what
        # refused the late command: the row still says "skipped", not "success".
        assert barrier == {
            ("action", "compensation", "skipped"),
            ("compensation", "compensation", "success"),
        }

        charged = details[lost_reply]
        events = [(h.event, h.step) for h in charged.history]
        assert events.count(("step_timed_out", "charge_payment")) == 1, events
        # The charge went through; its success reply came after the timeout.
        assert ("reply_ignored", "charge_payment") in events, events
        assert events[-1] == ("compensated", None), events
