"""The broker goes away and comes back.

* Down while the relay publishes: publishing fails within its bound, the outbox rows
  stay pending, and after the broker is back everything is delivered and acted on
  once.
* The broker restarted (its server process) under load, RabbitMQ and Kafka alike:
  the consumers come back by themselves, the backlog drains, the ledgers are exact.
* An outage shorter than the step timeout compensates nothing: a reply the outage
  held up wins over a deadline that fell due while the consumers came back (the
  reply watermark, engine/watermark.py).

The broker is stopped with ``scripts/services`` (RabbitMQ's app with ``rabbitmqctl``)
and always started again by the ``broker_control`` fixture. A broker this checkout
did not start (another checkout's, on the same port) cannot be stopped: the scenario
is then skipped, or failed under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.faults.harness import Broker, BrokerControl, scenario
from tests.faults.sagas import STEADY_TIMEOUT

pytestmark = pytest.mark.faults

#: The relay's publish bound (OutboxRelay.publish_timeout), plus slack for a loaded
#: machine.
PUBLISH_BOUND = 10.0 + 5.0
#: How long the broker stays stopped in the short-outage scenario (its stop and start
#: come on top).
SHORT_OUTAGE = 10.0


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


async def test_broker_restarted_under_load(
    broker: Broker, broker_control: BrokerControl, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()
        # Step timeouts longer than the restart: every order must complete or be
        # refused by the shipment, none compensated for a reply the restart delayed.
        ids = await run.start_many(80, saga="patient_order")

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


async def test_a_broker_outage_shorter_than_the_step_timeout_compensates_nothing(
    broker: Broker, broker_control: BrokerControl, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()
        # Orders at every stage when the broker goes: commands waiting for a worker,
        # replies waiting for the engine, rows waiting for the relay.
        ids = await run.start_many(200, saga="steady_order")

        async def under_way() -> bool:
            statuses = await run.client.statuses(ids)
            return sum(1 for s in statuses.values() if s is SagaStatus.COMPLETED) >= 5

        await run.wait_for("the load to get going", under_way, 60)
        stopped = time.monotonic()
        await broker_control.stop()
        await run.start_many(20, saga="steady_order")  # written during the outage
        await asyncio.sleep(SHORT_OUTAGE)  # the outage itself
        await broker_control.start()
        outage = time.monotonic() - stopped
        print(f"broker away for {outage:.1f}s (step timeout {STEADY_TIMEOUT:g}s)")
        assert outage < STEADY_TIMEOUT, (
            f"stopping and starting the broker took {outage:.0f}s, not shorter than the "
            f"{STEADY_TIMEOUT:g}s step timeout: this scenario proves nothing here"
        )

        details = await run.settle(timeout=300)
        timed_out = {
            saga_id: [h.step for h in d.history if h.event == "step_timed_out"]
            for saga_id, d in details.items()
        }
        timed_out = {saga_id: steps for saga_id, steps in timed_out.items() if steps}
        assert not timed_out, f"{len(timed_out)} sagas timed out: {timed_out}"
        await run.audit(details)  # every order as planned: completed, or refused
        assert await run.unsent() == 0
