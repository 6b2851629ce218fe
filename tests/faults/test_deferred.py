"""No message holds up another, between real processes on Kafka and on RabbitMQ.

* Replies for sagas that do not exist, then 10 good orders: the replies are set aside
  (``saga_deferred_replies``) and the consumer goes on, so the orders complete within
  2s of the same 10 orders' latency without them; after the patience (10s) the
  replies are dead letters with their reason.
* Replies set aside because their sagas were not committed yet, and the engine killed
  (SIGKILL) while they wait: the next engine applies them once their sagas commit,
  and dead-letters the ones whose sagas never come.
* A dead letter whose reason header carries a NUL byte is archived (shown as ``\\x00``)
  and the archive goes on with the next one.
"""

from __future__ import annotations

import statistics
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.definition import Saga
from engine.messages import Envelope, MessageKind, Outcome, encode
from engine.model import OutboxMessage
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus
from engine.store.base import StoreTransaction, write_transition
from engine.transport.base import DEAD_LETTER_ID, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.views import SagaDetail
from tests.faults.harness import Broker, Run, scenario

pytestmark = pytest.mark.faults

#: What the engine's default patience for a reply with no visible saga writes.
PATIENCE = "10s"


def _orphan_reply(saga_id: str) -> Envelope:
    """A successful reply to the first step of an order saga that does not exist."""
    return Envelope(
        saga_id=saga_id,
        saga_name="place_order",
        saga_version=1,
        step="reserve_inventory",
        kind=MessageKind.COMMAND,
        name="reserve_inventory",
        attempt=1,
    ).reply(Outcome.SUCCESS, payload={"reservation": f"r-{saga_id}"})


def _latency(detail: SagaDetail) -> float:
    """Start to completion, by the client's and the engine's commits."""
    return (detail.updated_at - detail.created_at).total_seconds()


async def _deferred(run: Run) -> int:
    return int(await run.scalar("SELECT count(*) FROM saga_deferred_replies"))


async def _wait_dead_letters(run: Run, saga_ids: list[str], timeout: float) -> dict[str, str]:
    """Wait until each of ``saga_ids`` has a dead letter; their reasons by saga."""

    async def archived() -> bool:
        rows = await run.rows(
            "SELECT saga_id FROM saga_dead_letters WHERE saga_id = ANY(:ids)", ids=saga_ids
        )
        return len(rows) >= len(saga_ids)

    await run.wait_for(f"dead letters of {saga_ids}", archived, timeout)
    rows = await run.rows(
        "SELECT saga_id, reason, source FROM saga_dead_letters WHERE saga_id = ANY(:ids)",
        ids=saga_ids,
    )
    assert {r.source for r in rows} == {run.topology.replies}
    return {r.saga_id: r.reason for r in rows}


async def test_replies_for_unknown_sagas_hold_up_no_order(broker: Broker, tmp_path: Path) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        cluster.start_engine()
        await run.warm_up()

        async def ten_orders() -> float:
            """Start 10 orders together; the latency of the slowest (all complete)."""
            good = [await run.start() for _ in range(10)]
            details = await run.settle(good, timeout=60)
            await run.audit(details)
            assert {d.status for d in details.values()} == {SagaStatus.COMPLETED}
            return max(_latency(d) for d in details.values())

        # Their idle latency, on this machine, now: the same load without the replies.
        idle = statistics.median([await ten_orders() for _ in range(3)])

        ghosts = [f"ghost-{uuid.uuid4().hex[:12]}" for _ in range(4)]
        async with run.transport() as transport:
            await transport.publish(
                [Message(run.topology.replies, g, encode(_orphan_reply(g))) for g in ghosts]
            )
        slowest = await ten_orders()
        print(f"10 orders: slowest {idle:.3f}s idle, {slowest:.3f}s behind the replies")
        assert slowest - idle <= 2.0, (idle, slowest)

        reasons = await _wait_dead_letters(run, ghosts, timeout=45)
        assert reasons == {g: f"no saga {g} after {PATIENCE}" for g in ghosts}
        assert await _deferred(run) == 0


async def test_deferred_replies_outlive_a_killed_engine(broker: Broker, tmp_path: Path) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        first = cluster.start_engine()
        await run.warm_up()

        # Two orders whose first commands go out before their sagas commit: the
        # workers reply at once, and the engine can only set the replies aside.
        definition = run.client.registry.get("place_order")
        late: dict[str, OutboxMessage] = {}
        ghosts = [f"ghost-{uuid.uuid4().hex[:12]}" for _ in range(2)]
        async with run.client.store.transaction() as tx:
            for _ in range(2):
                saga_id, command = await _insert_started(run, tx, definition)
                late[saga_id] = command
            async with run.transport() as transport:
                await transport.publish(
                    [
                        Message(c.destination, saga_id, encode(c.envelope))
                        for saga_id, c in late.items()
                    ]
                    + [Message(run.topology.replies, g, encode(_orphan_reply(g))) for g in ghosts]
                )

            async def all_set_aside() -> bool:
                return await _deferred(run) == 4

            await run.wait_for("four replies set aside", all_set_aside, 30)
            cluster.kill(first)
        # The sagas are visible now; only a new engine can apply their replies.
        assert await _deferred(run) == 4
        cluster.start_engine()

        details = await run.settle(list(late), timeout=60)
        await run.audit(details)
        for saga_id in late:
            reserve = next(s for s in details[saga_id].steps if s.name == "reserve_inventory")
            assert reserve.attempts == 1
            events = [h.event for h in details[saga_id].history]
            assert "reply_ignored" not in events, events
        reasons = await _wait_dead_letters(run, ghosts, timeout=45)
        assert reasons == {g: f"no saga {g} after {PATIENCE}" for g in ghosts}
        assert await _deferred(run) == 0


async def _insert_started(
    run: Run, tx: StoreTransaction, definition: Saga
) -> tuple[str, OutboxMessage]:
    """Insert one started order saga in ``tx`` with its first command marked sent (the
    test publishes it itself); the run expects it to complete."""
    saga_id = str(uuid.uuid4())
    order = run.order()
    now = run.client.clock()
    state = new_saga(definition, saga_id, order, now)
    transition = Transition(definition, state, now=now, topology=run.topology)
    transition.start()
    (command,) = transition.messages
    await write_transition(tx, state, transition.messages, transition.history, new=True)
    await tx.conn.execute(  # type: ignore[attr-defined]
        text("UPDATE saga_outbox SET sent_at = now() WHERE message_id = :id"),
        {"id": command.envelope.message_id},
    )
    run.orders[saga_id] = order
    run.expected[saga_id] = SagaStatus.COMPLETED
    return saga_id, command


async def test_a_dead_letter_with_nul_in_its_reason_is_archived_and_the_archive_goes_on(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        cluster.start_engine()
        await run.warm_up()

        def letter(body: bytes, reason: str) -> Message:
            headers = {
                DEAD_LETTER_REASON: reason,
                DEAD_LETTER_SOURCE: run.topology.replies,
                DEAD_LETTER_ID: uuid.uuid4().hex,
            }
            return Message(run.topology.dead_letters, "k", body, headers)

        async with run.transport() as transport:
            await transport.publish([letter(b"first", "bad\x00reason")])
            await transport.publish([letter(b"second", "plain reason")])
        after = await run.start()

        async def both_archived() -> bool:
            return int(await run.scalar("SELECT count(*) FROM saga_dead_letters")) >= 2

        await run.wait_for("two dead letters archived", both_archived, 30)
        rows = await run.rows("SELECT body, reason FROM saga_dead_letters ORDER BY id")
        assert [(bytes(r.body), r.reason) for r in rows] == [
            (b"first", "bad\\x00reason"),
            (b"second", "plain reason"),
        ]
        details = await run.settle([after], timeout=30)
        await run.audit(details)
