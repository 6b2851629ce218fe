"""Destination and consumer-group names are derived from the deployment's prefix."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import Subscription
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.worker.barrier import SqlBarrier
from engine.worker.runner import WorkerRunner
from sagas.order import place_order
from workers.inventory import worker as inventory


def test_names_carry_the_prefix() -> None:
    topology = Topology("acme")
    assert topology.commands("inventory") == "acme.commands.inventory"
    assert topology.replies == "acme.replies"
    assert topology.dead_letters == "acme.dead-letters"
    assert topology.group("saga-engine") == "acme.saga-engine"


class Recording(MemoryTransport):
    def __init__(self) -> None:
        super().__init__(MemoryBroker())
        self.groups: list[tuple[str, str]] = []
        self.both = asyncio.Event()

    async def subscribe(self, destination: str, *, group: str) -> Subscription:
        self.groups.append((destination, group))
        if len(self.groups) == 3:  # replies, dead letters (the archive), commands
            self.both.set()
        return await super().subscribe(destination, group=group)


async def test_engine_and_workers_join_groups_of_their_own_deployment(
    db: AsyncEngine,
) -> None:
    # Kafka consumer groups span topics: two deployments (prefixes) sharing a group
    # stall each other on every rebalance, e.g. for a crashed member's whole session.
    topology = Topology("acme")
    transport = Recording()
    await transport.connect()
    engine = Engine(SqlSagaStore(db), transport, SagaRegistry([place_order]), topology=topology)
    runner = WorkerRunner(inventory, transport, SqlBarrier(db), topology=topology)
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(runner.run())]
    await asyncio.wait_for(transport.both.wait(), 10)
    engine.stop()
    runner.stop()
    await asyncio.gather(*tasks)
    await transport.close()
    assert sorted(transport.groups) == [
        ("acme.commands.inventory", "acme.worker-inventory"),
        ("acme.dead-letters", "acme.saga-engine-dead-letters"),
        ("acme.replies", "acme.saga-engine"),
    ]
