"""Outages do not undo finished work: an engine in a crash loop.

The engine is SIGKILLed every 2 seconds for a minute (and started again each time)
while 2,000 orders go through; then one is left running. The workers keep answering,
so their replies pile up in the broker while no engine applies them, and many steps'
30-second deadlines pass meanwhile. A reply waiting in the broker must win over a
timeout that fell due while nobody was listening (the reply watermark,
engine/watermark.py): every order the participants completed must end COMPLETED, not
be charged and then refunded, and no step may time out at all (every reply existed).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.faults.harness import Broker, Run, scenario

pytestmark = pytest.mark.faults

ORDERS = 2_000
#: How long the engine is crash-looped, and how often it is killed.
LOOP = 60.0
KILL_EVERY = 2.0


async def _feed(run: Run, count: int, chunk: int = 50) -> list[str]:
    """Start ``count`` orders (every fourth one refused by the shipment), a chunk at a
    time, yielding between chunks so the kill loop keeps its cadence."""
    ids: list[str] = []
    while len(ids) < count:
        ids += await run.start_many(min(chunk, count - len(ids)))
        await asyncio.sleep(0)
    return ids


async def test_an_engine_killed_every_2s_for_a_minute_undoes_no_finished_work(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        engine = cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()

        feeding = asyncio.create_task(_feed(run, ORDERS))
        began = time.monotonic()
        kills = 0
        while time.monotonic() - began < LOOP:
            await asyncio.sleep(KILL_EVERY)  # the cadence of the crash loop itself
            cluster.kill(engine)
            kills += 1
            engine = cluster.start_engine()
            cluster.assert_running()
        await feeding
        print(f"{kills} engine kills in {time.monotonic() - began:.0f}s")

        # The orders' step timeout is 30s: many fell due during the loop, with their
        # replies waiting in the broker.
        details = await run.settle(timeout=600)
        await run.audit(details)  # completed where the participants completed
        timed_out = {
            saga_id: [h.step for h in detail.history if h.event == "step_timed_out"]
            for saga_id, detail in details.items()
        }
        timed_out = {saga_id: steps for saga_id, steps in timed_out.items() if steps}
        assert not timed_out, f"{len(timed_out)} sagas had a step time out: {timed_out}"
        statuses = [d.status for d in details.values()]
        completed = statuses.count(SagaStatus.COMPLETED)
        print(f"{completed} completed, {statuses.count(SagaStatus.COMPENSATED)} compensated")
        assert completed == sum(1 for s in run.expected.values() if s is SagaStatus.COMPLETED)
