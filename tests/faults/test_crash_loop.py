"""Outages do not undo finished work: an engine in a crash loop.

The engine is SIGKILLed two seconds after each start, for a minute (and started again
each time), while 2,000 orders go through; then one is left running. The workers keep
answering, so their replies pile up in the broker while no engine applies them, and
many steps' 30-second deadlines pass meanwhile. A reply waiting in the broker must win
over a timeout that fell due while nobody was listening (the reply watermark,
engine/watermark.py): every order the participants completed must end COMPLETED, not
charged and then refunded. A step may time out only where no reply existed: where its
participant had not acted yet when the timeout fired (a participant that falls more
than a step timeout behind its commands on a busy machine is "no answer came").
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
#: How long the engine is crash-looped, and how long each engine lives once up.
LOOP = 60.0
LIFETIME = 2.0


async def _feed(run: Run, count: int, within: float) -> list[str]:
    """Start ``count`` orders (every fourth one refused by the shipment) at a steady
    pace over ``within`` seconds, as customers would."""
    ids: list[str] = []
    began = time.monotonic()
    while len(ids) < count:
        due = min(count, int(count * (time.monotonic() - began) / within) + 20)
        if due > len(ids):
            ids += await run.start_many(due - len(ids))
        await asyncio.sleep(0.2)
    return ids


async def _timeouts(run: Run) -> list[tuple[str, str, bool]]:
    """Every step timeout: saga, step, and whether its participant had acted on that
    step (its barrier row, committed with the effect, before its reply went out)
    before the timeout fired."""
    rows = await run.rows(
        "SELECT h.saga_id, h.step, EXISTS (SELECT 1 FROM participant_barrier b "
        "WHERE b.saga_id = h.saga_id AND b.step = h.step AND b.op = 'action' "
        "AND b.created_at < h.at) FROM saga_history h WHERE h.event = 'step_timed_out'"
    )
    return [(saga_id, step, acted) for saga_id, step, acted in rows]


async def test_an_engine_killed_every_2s_for_a_minute_undoes_no_finished_work(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        engine = cluster.start_engine()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        await run.warm_up()

        feeding = asyncio.create_task(_feed(run, ORDERS, within=LOOP - 10))
        began = time.monotonic()
        kills = 0
        while time.monotonic() - began < LOOP:
            # Killed once it is up: on a busy machine a 2s-old process may not have
            # got as far as consuming, and would prove nothing.
            await cluster.ready(engine, timeout=60)
            await asyncio.sleep(LIFETIME)  # the cadence of the crash loop itself
            cluster.kill(engine)
            kills += 1
            engine = cluster.start_engine()
        await feeding
        print(f"{kills} engine kills in {time.monotonic() - began:.0f}s")

        details = await run.settle(timeout=600)
        timeouts = await _timeouts(run)
        wrong = [(saga_id, step) for saga_id, step, acted in timeouts if acted]
        print(f"{len(timeouts)} step timeouts, {len(wrong)} after their participant acted")
        assert not wrong, f"timed out though the participant had acted: {wrong[:20]}"
        # A timeout before the participant acted compensates: the books must say so.
        for saga_id, _, _ in timeouts:
            run.expected[saga_id] = SagaStatus.COMPENSATED
        await run.audit(details)  # completed where the participants completed
        statuses = [d.status for d in details.values()]
        print(
            f"{statuses.count(SagaStatus.COMPLETED)} completed, "
            f"{statuses.count(SagaStatus.COMPENSATED)} compensated"
        )
