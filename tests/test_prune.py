"""``SagaClient.prune`` and the store's ``count_finished`` / ``prune_finished``, on
SQLite and on real PostgreSQL.

Sagas are driven into every state by an Engine object applying scripted replies on a
clock the test sets, so "finished long ago" is exact. Every test checks both halves:
what had to go is gone, and everything else (running, compensating, parked, recent
sagas, and every row of theirs) is untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, insert, select, update

from engine.client import SagaClient
from engine.database import create_engine
from engine.definition import RetryPolicy, Saga
from engine.errors import SagaError
from engine.messages import Envelope, Outcome, decode
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.states import SagaStatus
from engine.store.schema import history, inbox, outbox, sagas, steps, timers
from engine.store.sql import SqlSagaStore
from engine.transport.memory import MemoryTransport
from engine.views import PruneCounts
from sagas.order import place_order
from tests.e2e import fresh_database
from tests.helpers import order_input
from tests.services import service_url

LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
MONTH = timedelta(days=30)

#: The order saga whose compensations get one attempt: an error reply parks it.
brittle_order = Saga(
    name="brittle_order",
    version=1,
    input=place_order.input,
    steps=[
        dataclasses.replace(step, compensation_retry=RetryPolicy(max_attempts=1))
        for step in place_order.steps
    ],
)
REGISTRY = SagaRegistry([place_order, brittle_order])

#: Tables a saga's rows live in, and the column naming the saga.
SAGA_TABLES = {
    "sagas": sagas.c.id,
    "steps": steps.c.saga_id,
    "history": history.c.saga_id,
    "timers": timers.c.saga_id,
    "outbox": outbox.c.key,
    "inbox": inbox.c.saga_id,
}
TABLES = {"sagas": sagas, "steps": steps, "history": history, "timers": timers}
TABLES.update({"outbox": outbox, "inbox": inbox})


class Script:
    """Plays the participants and the relay against one store, on a settable clock."""

    def __init__(self, store: SqlSagaStore, now: datetime = LONG_AGO) -> None:
        self.store = store
        self.now = now
        self.engine = Engine(store, MemoryTransport(), REGISTRY, clock=lambda: self.now)
        self.client = SagaClient(store, REGISTRY, clock=lambda: self.now)

    async def start(self, saga: str = "place_order") -> str:
        return await self.client.start(saga, order_input())

    async def awaited(self, saga_id: str) -> Envelope:
        async with self.store.engine.connect() as conn:
            bodies = await conn.scalars(
                select(outbox.c.body).where(outbox.c.key == saga_id).order_by(outbox.c.id)
            )
            return [decode(b.encode()) for b in bodies][-1]

    async def reply(self, saga_id: str, outcome: Outcome = Outcome.SUCCESS) -> Envelope:
        self.now += timedelta(seconds=1)
        reply = (await self.awaited(saga_id)).reply(outcome, error=None)
        assert await self.engine.handle_reply(reply)
        return reply

    async def relay(self) -> None:
        """Mark every outbox row sent, as a relay would after the broker confirmed."""
        async with self.store.transaction() as tx:
            rows = await tx.claim_outbox(100_000)
            await tx.mark_sent([r.id for r in rows], self.now)

    async def saga(self, status: SagaStatus) -> str:
        """A saga that ends up in ``status``, its messages all sent."""
        saga_id = await self.start(
            "brittle_order" if status is SagaStatus.PARKED else "place_order"
        )
        if status is SagaStatus.COMPLETED:
            for _ in place_order.steps:
                await self.reply(saga_id)
        elif status in (SagaStatus.COMPENSATED, SagaStatus.COMPENSATING, SagaStatus.PARKED):
            await self.reply(saga_id)
            await self.reply(saga_id, Outcome.FAILURE)  # the charge: compensate the reserve
            if status is SagaStatus.COMPENSATED:
                await self.reply(saga_id)
            elif status is SagaStatus.PARKED:
                await self.reply(saga_id, Outcome.ERROR)
        await self.relay()
        detail = await self.client.get(saga_id)
        assert detail.status is status, detail.history
        return saga_id


async def rows_of(store: SqlSagaStore, saga_id: str) -> dict[str, int]:
    async with store.engine.connect() as conn:
        return {
            name: int(
                await conn.scalar(
                    select(func.count()).select_from(TABLES[name]).where(column == saga_id)
                )
                or 0
            )
            for name, column in SAGA_TABLES.items()
        }


async def total_rows(store: SqlSagaStore) -> dict[str, int]:
    async with store.engine.connect() as conn:
        return {
            name: int(await conn.scalar(select(func.count()).select_from(table)) or 0)
            for name, table in TABLES.items()
        }


async def test_only_finished_sagas_older_than_the_age_go_with_all_their_rows(
    any_store: SqlSagaStore,
) -> None:
    script = Script(any_store)
    old = {s: await script.saga(s) for s in SagaStatus}
    # A finished saga with a stray timer row: it goes too.
    async with any_store.engine.begin() as conn:
        await conn.execute(
            insert(timers).values(
                saga_id=old[SagaStatus.COMPLETED],
                kind="retry",
                step="reserve_inventory",
                attempt=1,
                due_at=LONG_AGO,
            )
        )
    script.now = datetime.now(UTC) - timedelta(days=1)
    recent = await script.saga(SagaStatus.COMPLETED)
    finished = [old[SagaStatus.COMPLETED], old[SagaStatus.COMPENSATED]]
    kept = [old[s] for s in (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.PARKED)]
    kept.append(recent)
    before = {saga_id: await rows_of(any_store, saga_id) for saga_id in [*finished, *kept]}
    # The old ones really are older than the age: parked and running ones too.
    assert all(before[s]["inbox"] > 0 for s in finished)
    expected = PruneCounts(**{t: sum(before[s][t] for s in finished) for t in SAGA_TABLES})
    assert expected.timers == 1 and expected.sagas == 2

    client = SagaClient(any_store, REGISTRY)
    dry = await client.prune(MONTH, dry_run=True)
    assert dry.dry_run and dry.batches == 0
    assert dry.rows == expected
    assert {s: await rows_of(any_store, s) for s in before} == before  # a dry run removes nothing

    result = await client.prune(MONTH)
    assert result.rows == expected
    assert not result.dry_run
    for saga_id in finished:
        assert await rows_of(any_store, saga_id) == dict.fromkeys(SAGA_TABLES, 0)
    for saga_id in kept:
        assert await rows_of(any_store, saga_id) == before[saga_id]
    statuses = await client.statuses(kept)
    assert statuses[old[SagaStatus.RUNNING]] is SagaStatus.RUNNING
    assert statuses[old[SagaStatus.PARKED]] is SagaStatus.PARKED

    again = await client.prune(MONTH)
    assert again.rows == PruneCounts()


async def test_prune_works_in_batches_and_reports_progress(any_store: SqlSagaStore) -> None:
    script = Script(any_store)
    finished = [await script.saga(SagaStatus.COMPLETED) for _ in range(5)]
    seen: list[int] = []
    result = await SagaClient(any_store).prune(
        MONTH, batch=2, progress=lambda done: seen.append(done.sagas)
    )
    assert seen == [2, 4, 5]
    assert result.batches == 3
    assert result.rows.sagas == 5
    assert result.rows.steps == 5 * len(place_order.steps)
    assert await SagaClient(any_store).statuses(finished) == {}


async def test_a_saga_with_an_unsent_message_is_kept(any_store: SqlSagaStore) -> None:
    script = Script(any_store)
    saga_id = await script.saga(SagaStatus.COMPLETED)
    async with any_store.engine.begin() as conn:  # e.g. a dead letter replayed to it
        await conn.execute(
            update(outbox)
            .where(outbox.c.id == select(func.max(outbox.c.id)).scalar_subquery())
            .values(sent_at=None)
        )
    before = await rows_of(any_store, saga_id)
    client = SagaClient(any_store)
    assert (await client.prune(MONTH, dry_run=True)).rows == PruneCounts()
    assert (await client.prune(MONTH)).rows == PruneCounts()
    assert await rows_of(any_store, saga_id) == before


async def test_inbox_rows_without_a_saga_id_are_left_to_the_age_pruning(
    any_store: SqlSagaStore,
) -> None:
    """Rows written before migration 0006 name no saga: prune cannot tell whose they are."""
    script = Script(any_store)
    await script.saga(SagaStatus.COMPLETED)
    async with any_store.engine.begin() as conn:
        await conn.execute(
            insert(inbox).values(message_id="legacy", consumer="saga-engine", processed_at=LONG_AGO)
        )
    result = await SagaClient(any_store).prune(MONTH)
    assert result.rows.sagas == 1
    async with any_store.engine.connect() as conn:
        assert await conn.scalar(select(inbox.c.message_id)) == "legacy"


async def test_a_negative_age_or_an_empty_batch_is_refused(any_store: SqlSagaStore) -> None:
    client = SagaClient(any_store)
    with pytest.raises(SagaError, match="negative"):
        await client.prune(timedelta(seconds=-1))
    with pytest.raises(SagaError, match="at least one"):
        await client.prune(MONTH, batch=0)


@pytest.mark.integration
async def test_two_operators_pruning_at_once_remove_each_saga_once() -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        databases = [create_engine(url), create_engine(url)]
        try:
            stores = [SqlSagaStore(d) for d in databases]
            script = Script(stores[0])
            for _ in range(12):
                await script.saga(SagaStatus.COMPLETED)
            running = await script.saga(SagaStatus.RUNNING)
            expected = (await SagaClient(stores[0]).prune(MONTH, dry_run=True)).rows
            results = await asyncio.gather(*(SagaClient(s).prune(MONTH, batch=2) for s in stores))
            removed = results[0].rows + results[1].rows
            assert removed == expected
            left = await total_rows(stores[0])
            assert left == await rows_of(stores[0], running)
        finally:
            for d in databases:
                await d.dispose()


@pytest.mark.integration
async def test_a_saga_locked_by_another_writer_is_skipped_not_waited_for() -> None:
    """A late reply holding a finished saga's row does not stall the prune."""
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        db = create_engine(url)
        try:
            store = SqlSagaStore(db)
            script = Script(store)
            busy = await script.saga(SagaStatus.COMPLETED)
            idle = await script.saga(SagaStatus.COMPLETED)
            client = SagaClient(store)
            async with db.begin() as writer:
                await writer.execute(select(sagas.c.id).where(sagas.c.id == busy).with_for_update())
                result = await asyncio.wait_for(client.prune(MONTH), timeout=5)
                assert result.rows.sagas == 1
                assert await client.statuses([busy, idle]) == {busy: SagaStatus.COMPLETED}
            assert (await client.prune(MONTH)).rows.sagas == 1
            assert await client.statuses([busy]) == {}
        finally:
            await db.dispose()
