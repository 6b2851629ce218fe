"""Members come and go under load.

* Kafka: a payment worker is killed mid-run (at ``worker.after_commit``, holding a
  committed charge it never answered for) and another one joins: the partitions are
  rebalanced, nothing is lost, the redelivered duplicate is absorbed.
* Two engine replicas under load, one killed (SIGKILL): the other takes over its
  sagas (its Kafka partitions, its unacknowledged RabbitMQ deliveries, its timers
  and outbox rows); every saga finishes; none is advanced twice.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.e2e import Daemon
from tests.faults.harness import Broker, scenario

ASSIGNED = re.compile(r"assigned partitions \[([\d, ]*)\]")


def assignment(daemon: Daemon) -> set[int]:
    """The partitions a worker said it holds last (the transport's INFO line)."""
    found = ASSIGNED.findall(daemon.log_path.read_text())
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()


pytestmark = pytest.mark.faults


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_kafka_worker_added_and_one_killed_mid_run(broker: Broker, tmp_path: Path) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        cluster.start_engine()
        cluster.start_worker("inventory")
        cluster.start_worker("shipment")
        doomed = cluster.start_worker("payment", crash="worker.after_commit:10")
        other = cluster.start_worker("payment")
        await run.warm_up()

        async def shared() -> bool:
            # The group's first rebalance is over: each member holds its own share.
            # Before that, the first member alone may take the whole load and the
            # doomed one never reaches its 10th commit.
            mine, theirs = assignment(doomed), assignment(other)
            return bool(mine) and bool(theirs) and not mine & theirs

        await run.wait_for("the payment workers to share the partitions", shared, 60)
        ids = await run.start_many(60)
        await cluster.crashed(doomed, "worker.after_commit")
        cluster.start_worker("payment")  # joins while the dead member still holds its share
        details = await run.settle(timeout=120)
        await run.audit(details)
        assert len(details) == len(ids) + 1
        payment_logs = [d for d in cluster.daemons if d.name == "payment"]
        # Each payment worker got partitions (the transport's own INFO line: aiokafka's
        # "Setting newly assigned partitions" is library chatter, hidden by default).
        assert all("assigned partitions [" in d.log_path.read_text() for d in payment_logs)


async def test_two_engines_under_load_one_killed(broker: Broker, tmp_path: Path) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        doomed = cluster.start_engine()
        survivor = cluster.start_engine()
        await run.warm_up()
        ids = await run.start_many(80)

        async def under_way() -> bool:
            statuses = await run.client.statuses(ids)
            return sum(1 for s in statuses.values() if s is SagaStatus.COMPLETED) >= 10

        await run.wait_for("the load to get going", under_way, 60)
        cluster.kill(doomed)
        at_kill = await run.client.statuses(ids)
        in_flight = [s for s in ids if not at_kill[s].is_terminal]
        assert in_flight, "the replica was killed after the load was done"
        ids += await run.start_many(20)  # more work arrives after the crash
        details = await run.settle(timeout=120)
        await run.audit(details)  # every saga settled; none advanced twice
        assert survivor.process.poll() is None
        print(f"{len(in_flight)} sagas in flight when a replica was killed")
