"""Poison messages: what can never be processed lands on the dead-letter topic/queue
with its reason, the consumers keep flowing, and the saga records the failure and
compensates. A routine failure is no dead letter (issue 12).

* A handler that raises on every attempt (``tests.faults.workers:shipment_poison``):
  retried per the step's policy; on the last attempt (the engine names it in the
  ``saga-last-attempt`` header) the worker replies the error like on the others and
  nothing is dead-lettered; the saga gives up on the step and compensates.
* A command its worker has no handler for (``unhandled_order``): the worker answers
  with a failure naming the cause, the saga compensates at once (long before its
  step's timeout), and nothing is dead-lettered.
* An undecodable command (its body mangled on the way): dead-lettered at once by the
  worker; its saga never hears back, times out (``quick_order``) and compensates.
* An undecodable reply: dead-lettered by the engine, which goes on with its work.

The engine archives every dead letter in ``saga_dead_letters`` (``sagactl dlq list``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.messages import encode
from engine.states import SagaStatus
from tests.faults.harness import Broker, scenario
from tests.faults.sagas import UNHANDLED
from tests.faults.workers import POISON

pytestmark = pytest.mark.faults


async def test_poison_messages_are_dead_lettered_and_their_sagas_compensate_routine_ones_not(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        cluster.start_worker("inventory")
        cluster.start_worker("payment")
        cluster.start_worker("shipment", spec="tests.faults.workers:shipment_poison")
        await run.warm_up()

        bug = await run.start(address=f"13 {POISON} street", expect=SagaStatus.COMPENSATED)
        unhandled = await run.start("unhandled_order", expect=SagaStatus.COMPENSATED)
        mangled, command = await run.start_lost("quick_order")
        body = encode(command.envelope)
        await run.publish(command.destination, mangled, body[: len(body) // 2])
        await run.publish(run.topology.replies, "nobody", b"\x00 not a reply")
        healthy = await run.start_many(8)  # the consumers keep flowing around them

        details = await run.settle(timeout=60)
        await run.audit(details)
        assert all(details[s].status is run.expected[s] for s in healthy)

        async def archived() -> bool:
            return await run.scalar("SELECT count(*) FROM saga_dead_letters") >= 2

        await run.wait_for("two dead letters in the archive", archived, 30)
        letters = {
            r.source: r
            for r in await run.rows("SELECT source, reason, saga_id FROM saga_dead_letters")
        }
        # The handler bug failed its step and is no dead letter: only the undecodable.
        assert set(letters) == {run.topology.commands("inventory"), run.topology.replies}
        assert {bug, unhandled}.isdisjoint(r.saga_id for r in letters.values())
        step = run.client.registry.get("place_order").step("create_shipment")
        assert "not a saga envelope" in letters[run.topology.commands("inventory")].reason
        assert "not a saga envelope" in letters[run.topology.replies].reason

        # The saga recorded every failed attempt, the cause, and compensated.
        events = [(h.event, h.step) for h in details[bug].history]
        errors = [e for e in events if e == ("step_error", "create_shipment")]
        assert len(errors) == step.retry.max_attempts - 1, events
        assert ("step_failed", "create_shipment") in events
        assert ("compensated", None) in events, events
        assert details[bug].error == (
            f"step 'create_shipment' failed after {step.retry.max_attempts} attempts: "
            f"TypeError: handler bug: cannot ship to '13 {POISON} street'"
        )
        after = (await run.client.get(bug)).history
        assert not any(h.event == "dead_lettered" for h in after), after

        # No handler: failed by the worker's answer, not by the step's timeout.
        assert details[unhandled].error == (
            f"step 'create_shipment' failed: worker 'shipment' has no handler for command "
            f"'{UNHANDLED}'"
        )
        events = [(h.event, h.step) for h in details[unhandled].history]
        assert ("step_failed", "create_shipment") in events, events
        assert ("step_timed_out", "create_shipment") not in events, events

        lost = [(h.event, h.step) for h in details[mangled].history]
        assert ("step_timed_out", "reserve_inventory") in lost, lost
        assert lost[-1] == ("compensated", None), lost
