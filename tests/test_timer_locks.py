"""Timers and replies on PostgreSQL: the timer scan must not deadlock with a reply.

A reply being applied locks its saga row (the optimistic version update), then writes
the saga's timer row. The timer scan used to lock the timer row first and the saga row
second: the two orders deadlocked, and PostgreSQL aborted one of them after a second
(the fault suite caught it when a reply and its step's timeout came due together).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from engine.client import SagaClient
from engine.database import create_engine
from engine.registry import SagaRegistry
from engine.store.sql import SqlSagaStore
from sagas.order import place_order
from tests.e2e import fresh_database, service_url
from tests.helpers import order_input

pytestmark = pytest.mark.integration

LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
SAGA = "UPDATE saga_instances SET row_version = row_version + 1 WHERE id = :id"
TIMER = "UPDATE saga_timers SET due_at = due_at + interval '1 second' WHERE saga_id = :id"


async def test_a_reply_and_a_due_timer_of_one_saga_do_not_deadlock() -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        db = create_engine(url)
        store = SqlSagaStore(db)
        client = SagaClient(store, SagaRegistry([place_order]), clock=lambda: LONG_AGO)
        saga_id = await client.start("place_order", order_input())
        now = datetime.now(UTC) + timedelta(seconds=1)
        try:
            # The timer scan first, then a reply (in the reply path's lock order).
            async with store.transaction() as scan:
                assert [d.saga_id for d in await scan.due_timers(now, 10)] == [saga_id]

                async def reply() -> None:
                    async with db.begin() as conn:
                        await conn.execute(text(SAGA), {"id": saga_id})
                        await conn.execute(text(TIMER), {"id": saga_id})

                applying = asyncio.create_task(reply())
                await asyncio.sleep(0.3)
                assert not applying.done()  # waits for the scan, holding nothing it needs
                await scan.conn.execute(text(SAGA), {"id": saga_id})  # the timer fires
            await asyncio.wait_for(applying, 10)

            # A reply first: the scan skips that saga instead of waiting for it.
            async with db.begin() as conn:
                await conn.execute(text(SAGA), {"id": saga_id})
                async with store.transaction() as scan:
                    assert await scan.due_timers(now + timedelta(seconds=5), 10) == []
                await conn.execute(text(TIMER), {"id": saga_id})
            async with store.transaction() as scan:
                due = await scan.due_timers(now + timedelta(seconds=5), 10)
                assert [d.saga_id for d in due] == [saga_id]
        finally:
            await db.dispose()
