"""Outages do not undo finished work: an engine in a crash loop.

The engine is SIGKILLed every two seconds for a minute (and started again each time)
while 2,000 orders go through; then one is left running. The workers keep answering,
so their replies pile up in the broker while no engine applies them, and the commands
written meanwhile go out late, when an engine gets far enough to relay them: many
steps' 30-second deadlines pass with their replies waiting, or before their commands
even went out. A reply waiting in
the broker must win over a timeout that fell due while nobody was listening (the
reply watermark, engine/watermark.py): every order the participants completed must
end COMPLETED, not charged and then refunded. A step may time out only where no reply
came in time: its participant acted only after the step's deadline (on a busy machine
a participant can fall more than a step timeout behind its commands; that is "no
answer came").
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
KILL_EVERY = 2.0
#: place_order's step timeout.
STEP_TIMEOUT = 30.0
#: A worker sends the replies of a batch of commands together, after committing them
#: all: on a busy machine seconds after the first was acted on.
REPLY_LAG = 5.0


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


async def _timeouts(run: Run) -> list[tuple[str, str, float]]:
    """Every step timeout: saga, step, and how many seconds before the step's deadline
    its participant acted (committed its effect, and then sent the reply); negative:
    only after the deadline. The deadline is the step's timeout after it was
    dispatched, or after the timeout was last restarted (its command went out late)."""
    rows = await run.rows(
        "SELECT h.saga_id, h.step, EXTRACT(EPOCH FROM ("
        "  (SELECT max(d.at) FROM saga_history d WHERE d.saga_id = h.saga_id AND d.at < h.at"
        "   AND d.event IN ('started', 'step_succeeded', 'timeout_postponed'))"
        "  + make_interval(secs => :timeout) - b.created_at)) "
        "FROM saga_history h JOIN participant_barrier b ON b.saga_id = h.saga_id "
        "AND b.step = h.step AND b.op = 'action' WHERE h.event = 'step_timed_out'",
        timeout=STEP_TIMEOUT,
    )
    return [(saga_id, step, float(ahead)) for saga_id, step, ahead in rows]


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
            await asyncio.sleep(KILL_EVERY)  # the cadence of the crash loop itself
            cluster.kill(engine)
            kills += 1
            engine = cluster.start_engine()
        await feeding
        print(f"{kills} engine kills in {time.monotonic() - began:.0f}s")

        details = await run.settle(timeout=600)
        timeouts = await _timeouts(run)
        wrong = [(saga_id, step, ahead) for saga_id, step, ahead in timeouts if ahead > REPLY_LAG]
        print(f"{len(timeouts)} step timeouts, {len(wrong)} of them with a reply in time")
        assert not wrong, f"timed out though the participant answered in time: {wrong[:10]}"
        # A participant that answers after the deadline is "no answer came": the saga
        # compensates, and the books must say so.
        for saga_id, _, _ in timeouts:
            run.expected[saga_id] = SagaStatus.COMPENSATED
        await run.audit(details)  # completed where the participants completed
        statuses = [d.status for d in details.values()]
        print(
            f"{statuses.count(SagaStatus.COMPLETED)} completed, "
            f"{statuses.count(SagaStatus.COMPENSATED)} compensated"
        )
