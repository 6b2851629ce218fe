"""A row the broker refuses for good never holds up the outbox (issue 9).

The relay publishes the rows around it, takes it out of the outbox in the same
transaction, archives it as a dead letter, and the engine fails its step: the saga
compensates what ran before it. On SQLite and PostgreSQL, over the in-process broker
with a message size limit; ``tests/faults/test_refused.py`` does it on real brokers.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from engine.client import SagaClient
from engine.messages import MessageKind, Outcome
from engine.model import HistoryEntry
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.states import SagaStatus, StepStatus
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.memory import MemoryBroker, MemoryTransport
from sagas.order import place_order
from tests.faults.sagas import PLUMP, plump_order
from tests.helpers import (
    EmbeddedSystem,
    assert_books_balance,
    envelopes,
    fast_order_saga,
    history_events,
    order_input,
    wait_until,
)

LIMIT = 100_000
TOPOLOGY = Topology()


async def _unsent(store: SqlSagaStore) -> int:
    async with store.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        )
    return int(count or 0)


async def _connected(broker: MemoryBroker) -> MemoryTransport:
    transport = MemoryTransport(broker)
    await transport.connect()
    return transport


async def test_the_rows_around_a_refused_one_are_sent_and_its_saga_compensates(
    any_store: SqlSagaStore,
) -> None:
    assert PLUMP > LIMIT
    broker = MemoryBroker(max_message_bytes=LIMIT)
    engine, bulky = await _at_charge(any_store, broker)
    client = SagaClient(any_store, engine.registry)
    inventory, payment = TOPOLOGY.commands("inventory"), TOPOLOGY.commands("payment")
    good = [await client.start("place_order", order_input()) for _ in range(3)]

    # The oversized charge is the oldest unsent row; the three orders wait behind it.
    assert await engine.relay.relay_once() == 4
    assert broker.depth(inventory) == 3 and broker.depth(payment) == 0
    assert (engine.relay.published, engine.relay.refused) == (4, 1)
    detail = await client.get(bulky)
    charge = next(s for s in detail.steps if s.name == "charge_payment")
    assert charge.status is StepStatus.FAILED
    assert charge.error is not None
    assert charge.error.startswith("command could not be delivered: message of ")
    assert charge.error.endswith("bytes is over the limit of 100000 bytes")
    assert detail.status is SagaStatus.COMPENSATING
    assert detail.error is not None and "could not be delivered" in detail.error
    assert history_events(detail, "undeliverable") == ["charge_payment"]
    assert history_events(detail, "dead_lettered") == ["charge_payment"]

    # The release of its stock is the next row; the good orders go on meanwhile.
    assert await engine.relay.relay_once() == 1
    release = envelopes(broker.drain(inventory))[-1]
    assert (release.saga_id, release.kind) == (bulky, MessageKind.COMPENSATION)
    assert await engine.handle_reply(release.reply(Outcome.SUCCESS))
    assert (await client.get(bulky)).status is SagaStatus.COMPENSATED
    assert await _unsent(any_store) == 0
    assert set((await client.statuses(good)).values()) == {SagaStatus.RUNNING}

    (letter,) = await client.dead_letters()
    assert (letter.source, letter.saga_id, letter.step) == (payment, bulky, "charge_payment")
    assert letter.kind is MessageKind.COMMAND
    assert "over the limit of 100000 bytes" in letter.reason


async def _at_charge(store: SqlSagaStore, broker: MemoryBroker) -> tuple[Engine, str]:
    """An engine (not running) and a bulky order whose oversized charge is unsent."""
    registry = SagaRegistry([place_order, plump_order])
    engine = Engine(store, await _connected(broker), registry, topology=TOPOLOGY)
    bulky = await SagaClient(store, registry).start("plump_order", order_input())
    assert await engine.relay.relay_once() == 1
    (reserve,) = envelopes(broker.drain(TOPOLOGY.commands("inventory")))
    assert await engine.handle_reply(reserve.reply(Outcome.SUCCESS, {"left": 1}))
    return engine, bulky


@pytest.mark.integration
async def test_the_relay_waits_for_a_saga_the_reply_path_holds_and_never_blocks_it(
    pg_store: SqlSagaStore,
) -> None:
    # The relay holds the outbox rows it claimed, then locks the refused row's saga.
    # The reply path (and the timer scan) hold a saga's lock and then only insert
    # outbox rows: they never wait for the relay's, so the two cannot deadlock.
    engine, bulky = await _at_charge(pg_store, MemoryBroker(max_message_bytes=LIMIT))
    async with pg_store.transaction() as tx:
        state = (await tx.lock_sagas([bulky]))[bulky]
        relay = asyncio.create_task(engine.relay.relay_once())

        async def relay_waits_for_the_saga() -> bool:
            assert not relay.done(), relay
            async with pg_store.engine.connect() as conn:
                waiting = await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock'"
                    )
                )
            return bool(waiting)

        await wait_until(relay_waits_for_the_saga, 10, "the relay to wait for the saga lock")
        async with asyncio.timeout(10):  # what the reply path writes, under the lock
            state.updated_at = engine.clock()
            await tx.save_saga(state)
            await tx.add_raw_outbox("elsewhere", bulky, "next", {}, engine.clock())
            await tx.add_history(bulky, [HistoryEntry(engine.clock(), "noted")])
    assert await asyncio.wait_for(relay, 10) == 1
    detail = await engine.store.get_saga(bulky)
    assert detail is not None and detail.status is SagaStatus.COMPENSATING
    assert history_events(detail, "noted") == [None]


async def test_a_relay_without_an_engine_still_takes_a_refused_row_out(
    any_store: SqlSagaStore, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker(max_message_bytes=LIMIT)
    relay = OutboxRelay(any_store, await _connected(broker))
    client = SagaClient(any_store, SagaRegistry([place_order, plump_order]))
    async with any_store.transaction() as tx:
        await tx.add_raw_outbox("elsewhere", "k", "y" * (LIMIT + 1), {}, client.clock())
        await tx.add_raw_outbox("elsewhere", "k", "small", {}, client.clock())

    with caplog.at_level(logging.ERROR, logger="saga.relay"):
        assert await relay.relay_once() == 2

    assert [m.body for m in broker.drain("elsewhere")] == [b"small"]
    assert await _unsent(any_store) == 0
    assert "refused by the broker for good, dead-lettered" in caplog.text
    (letter,) = await client.dead_letters()
    assert (letter.source, letter.saga_id, letter.kind) == ("elsewhere", None, None)


async def test_one_oversized_order_among_many_fails_alone(tmp_path: Path) -> None:
    async with EmbeddedSystem(
        tmp_path / "system.db", sagas=(fast_order_saga(), plump_order)
    ) as system:
        system.broker.max_message_bytes = LIMIT
        bulky = await system.client.start("plump_order", order_input())
        good = [await system.start_order() for _ in range(20)]

        sagas = await system.wait_all_terminal(30, [bulky, *good])

        assert all(sagas[s].status is SagaStatus.COMPLETED for s in good)
        assert sagas[bulky].status is SagaStatus.COMPENSATED
        effect_of = await system.effects()
        for detail in sagas.values():
            assert_books_balance(detail, effect_of)
        assert history_events(sagas[bulky], "step_compensated") == ["reserve_inventory"]
        totals = await system.totals()
        assert totals.stock_conserved and totals.money_conserved
