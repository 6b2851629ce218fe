"""Replies the engine must not apply twice, nor drop.

* The same reply delivered twice, to two engine replicas: replica A applies it and is
  killed before acknowledging (``engine.after_commit``); the broker hands it to
  replica B, whose inbox recognises it. The saga advances once.
* A reply that arrives before the saga row it answers is visible: the engine sets it
  aside and retries it until the row commits, and applies it then.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.messages import encode
from engine.registry import SagaRegistry
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus
from engine.store.base import write_transition
from engine.store.sql import SqlSagaStore
from tests.faults.harness import SAGA_MODULES, Broker, scenario

pytestmark = pytest.mark.faults


async def test_a_reply_delivered_twice_to_two_replicas_advances_the_saga_once(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        first = cluster.start_engine(crash="engine.after_commit:2")
        second = cluster.start_engine()
        await cluster.ready(first, second)
        # patient_order: replica A's unacknowledged reply reaches B only once A's
        # session expired, which on a busy machine may outlast place_order's timeout.
        await run.feed_until(first, saga="patient_order")
        await cluster.crashed(first, "engine.after_commit")

        details = await run.settle(timeout=90)
        # No step advanced twice. (The killed replica may also have been between
        # publishing outbox rows and marking them sent: those commands go out again and
        # their repeated replies are ignored by their attempt tokens.)
        await run.audit(details)
        # The reply replica A applied but never acknowledged came to replica B, whose
        # inbox knew it: acknowledged without a second transition.
        log = second.log_path.read_text()
        assert "was applied before: a duplicate" in log, cluster.logs()


async def test_a_reply_before_its_saga_row_is_visible_is_retried_not_dropped(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        engine = cluster.start_engine()
        warm_up = await run.start()  # the whole pipeline is live before the trick
        await run.wait_status(warm_up, SagaStatus.COMPLETED)

        # Start a saga by hand, and publish its first command before the transaction
        # that inserts the saga row (and the same command, in the outbox) commits.
        definition = SagaRegistry.from_modules(SAGA_MODULES).get("place_order")
        saga_id = str(uuid.uuid4())
        order = run.order()
        now = run.client.clock()
        state = new_saga(definition, saga_id, order, now)
        transition = Transition(definition, state, now=now, topology=run.topology)
        transition.start()
        (command,) = transition.messages
        store = SqlSagaStore(run.database)
        async with store.transaction() as tx:
            await write_transition(tx, state, transition.messages, transition.history, new=True)
            # The relay will never send it again: it went out "early", below.
            await tx.conn.execute(
                text("UPDATE saga_outbox SET sent_at = now() WHERE message_id = :id"),
                {"id": command.envelope.message_id},
            )
            await run.publish(command.destination, saga_id, encode(command.envelope))
            # The inventory worker handled it and replied; the engine cannot see the
            # saga yet and must keep the reply until it can.
            deadline = time.monotonic() + 30
            while "is not visible (yet)" not in engine.log_path.read_text():
                assert time.monotonic() < deadline, cluster.logs()
                cluster.assert_running()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # a few retries while the row stays invisible
        run.orders[saga_id] = order
        run.expected[saga_id] = SagaStatus.COMPLETED

        details = await run.settle(timeout=30)
        await run.audit(details)
        reserve = next(s for s in details[saga_id].steps if s.name == "reserve_inventory")
        assert reserve.attempts == 1
        assert not [h for h in details[saga_id].history if h.event == "reply_ignored"]
        # It was set aside (not held by the consumer) and deleted once applied.
        assert "set aside" in engine.log_path.read_text()
        assert await run.scalar("SELECT count(*) FROM saga_deferred_replies") == 0
