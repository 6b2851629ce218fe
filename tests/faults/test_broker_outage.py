"""The broker goes away and comes back.

* Down while the relay publishes: publishing fails within its bound, the outbox rows
  stay pending, and after the broker is back everything is delivered and acted on
  once.
* RabbitMQ restarted (the server process) under load: the consumers come back by
  themselves, the backlog drains, the ledgers are exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.faults.harness import Broker, BrokerControl, scenario

pytestmark = pytest.mark.faults

#: The relay's publish bound (OutboxRelay.publish_timeout), plus slack for a loaded
#: machine.
PUBLISH_BOUND = 10.0 + 5.0


async def test_broker_down_while_the_relay_publishes(
    broker: Broker, broker_control: BrokerControl, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        engine = cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()

        await broker_control.stop()
        stopped = time.monotonic()
        ids = await run.start_many(10)
        failed = "outbox publish failed, rows stay pending"

        async def publish_failed() -> bool:
            return failed in engine.log_path.read_text(errors="replace")

        await run.wait_for("the relay to give up on a publish", publish_failed, PUBLISH_BOUND)
        took = time.monotonic() - stopped
        print(f"publish failed {took:.1f}s after the broker stopped")
        # Nothing of it was marked sent: the rows wait for the broker.
        assert await run.unsent() == len(ids)

        await broker_control.start()
        details = await run.settle(timeout=120)
        await run.audit(details)
        assert await run.unsent() == 0
        for detail in details.values():
            for step in detail.steps:
                assert step.attempts <= 1 and step.compensation_attempts <= 1, step


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
async def test_rabbitmq_restarted_under_load(
    broker: Broker, broker_control: BrokerControl, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()
        ids = await run.start_many(80)

        async def under_way() -> bool:
            statuses = await run.client.statuses(ids)
            done = sum(1 for s in statuses.values() if s is SagaStatus.COMPLETED)
            return done >= 5

        await run.wait_for("the load to get going", under_way, 30)
        await broker_control.restart_process()
        details = await run.settle(timeout=120)
        await run.audit(details)
        assert await run.unsent() == 0
        statuses = [d.status for d in details.values()]
        print(
            f"{statuses.count(SagaStatus.COMPLETED)} completed, "
            f"{statuses.count(SagaStatus.COMPENSATED)} compensated"
        )
