"""A command the broker refuses for good fails its own saga, and only that (issue 9).

On the real brokers, with their real limits: Kafka's ``message.max.bytes`` (1 MiB by
default) and RabbitMQ's ``max_message_size``, lowered to 1 MiB for this scenario's
connections (its default, 128 MiB, would cost the test seconds and hundreds of MiB per
copy). The engine's own limits are set above them, so that it is the broker that
refuses the 2 MB charge command of ``bulky_order``. The relay publishes the rows
around it, archives it as a dead letter and fails the step; the saga releases its
stock, while 200 orders started after it complete as if nothing happened.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from engine.states import SagaStatus, StepStatus
from tests.faults.harness import Broker, scenario
from tests.services import rabbit_message_limit

pytestmark = pytest.mark.faults

ORDERS = 200
#: What each broker refuses, and the engine's limits above the broker's:
#: SAGA_MAX_MESSAGE_BYTES is the engine's own limit on a message it builds.
CASES = {
    "kafka": (
        "MessageSizeTooLargeError",
        {
            "SAGA_MAX_MESSAGE_BYTES": "8000000",
            "SAGA_KAFKA_MAX_REQUEST_SIZE": str(8 * 1024 * 1024),
        },
    ),
    "rabbitmq": ("larger than configured max size", {"SAGA_MAX_MESSAGE_BYTES": "8000000"}),
}


async def test_a_command_over_the_brokers_limit_fails_its_saga_alone(
    broker: Broker, tmp_path: Path
) -> None:
    refusal, limits = CASES[broker.name]
    async with AsyncExitStack() as stack:
        if broker.name == "rabbitmq":
            await stack.enter_async_context(rabbit_message_limit())
        run = await stack.enter_async_context(scenario(broker, tmp_path))
        cluster = run.cluster
        cluster.extra_env.update(limits)
        cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()

        bulky = await run.start("bulky_order", expect=SagaStatus.COMPENSATED)
        others = [await run.start() for _ in range(ORDERS)]

        details = await run.settle(timeout=180)
        await run.audit(details)
        assert all(details[s].status is SagaStatus.COMPLETED for s in others)
        assert await run.unsent() == 0

        charge = next(s for s in details[bulky].steps if s.name == "charge_payment")
        assert charge.status is StepStatus.FAILED
        assert charge.error is not None and refusal in charge.error
        assert "max_request_size" not in charge.error  # the broker's refusal, not the client's
        events = [(h.event, h.step) for h in details[bulky].history]
        assert ("undeliverable", "charge_payment") in events, events
        assert ("step_compensated", "reserve_inventory") in events, events
        letters = await run.rows("SELECT source, reason, saga_id FROM saga_dead_letters")
        assert [(r.source, r.saga_id) for r in letters] == [
            (run.topology.commands("payment"), bulky)
        ]
        assert refusal in letters[0].reason
