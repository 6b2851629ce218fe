"""The store's batch operations (what the engine applies a batch of replies with), on
SQLite and on real PostgreSQL: same results as one saga at a time, the same conflict
detection, and row locks on PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from engine.errors import ConcurrencyConflict
from engine.model import HistoryEntry, Timer, TimerKind
from engine.states import SagaStatus, StepStatus
from engine.store.base import write_transitions
from engine.store.schema import inbox
from engine.store.sql import SqlSagaStore
from tests.test_store_sql import T0, insert, load


async def test_lock_sagas_returns_the_existing_ones_with_steps_and_timers(
    any_store: SqlSagaStore,
) -> None:
    store = any_store
    for saga_id in ("b", "a", "c"):
        await insert(store, saga_id)
    async with store.transaction() as tx:
        images = await tx.lock_sagas(["c", "missing", "a", "c"])
    assert sorted(images) == ["a", "c"]
    for saga_id, image in images.items():
        single = await load(store, saga_id)
        assert image == single


async def test_save_sagas_writes_each_change_like_save_saga(any_store: SqlSagaStore) -> None:
    store = any_store
    for saga_id in ("s1", "s2", "s3"):
        await insert(store, saga_id)
    async with store.transaction() as tx:
        images = await tx.lock_sagas(["s1", "s2", "s3"])
        s1, s2, s3 = images["s1"], images["s2"], images["s3"]
        s1.status, s1.error = SagaStatus.COMPENSATING, "boom"
        s1.steps["first"].status = StepStatus.FAILED
        s2.timer = None  # cleared
        s3.timer = Timer(TimerKind.RETRY, "first", 2, T0 + timedelta(seconds=7))  # moved
        s3.steps["second"].reply = {"ok": True}
        entries = [HistoryEntry(T0, f"event-{s.id}") for s in (s1, s2, s3)]
        await write_transitions(
            tx, [(s, [], [e]) for s, e in zip((s1, s2, s3), entries, strict=True)]
        )
        assert [s.row_version for s in (s1, s2, s3)] == [1, 1, 1]
    again = {saga_id: await load(store, saga_id) for saga_id in ("s1", "s2", "s3")}
    assert again["s1"] is not None and again["s2"] is not None and again["s3"] is not None
    assert (again["s1"].status, again["s1"].error) == (SagaStatus.COMPENSATING, "boom")
    assert again["s1"].steps["first"].status is StepStatus.FAILED
    assert again["s2"].timer is None
    assert again["s3"].timer == Timer(TimerKind.RETRY, "first", 2, T0 + timedelta(seconds=7))
    assert again["s3"].steps["second"].reply == {"ok": True}
    assert all(s.row_version == 1 for s in again.values() if s is not None)
    for saga_id in ("s1", "s2", "s3"):
        detail = await store.get_saga(saga_id)
        assert detail is not None and detail.history[-1].event == f"event-{saga_id}"
    async with store.transaction() as tx:
        due = await tx.due_timers(T0 + timedelta(days=1), 10)
        assert sorted(d.saga_id for d in due) == ["s1", "s3"]  # s2 cleared its timer


async def test_save_sagas_of_stale_images_conflicts_and_writes_nothing(
    any_store: SqlSagaStore,
) -> None:
    store = any_store
    for saga_id in ("s1", "s2"):
        await insert(store, saga_id)
    stale = [await load(store, "s1"), await load(store, "s2")]
    async with store.transaction() as tx:
        fresh = await tx.load_saga("s2")
        assert fresh is not None
        fresh.error = "winner"
        await tx.save_saga(fresh)
    for image in stale:
        assert image is not None
        image.error = "loser"
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.save_sagas([s for s in stale if s is not None])
    s1, s2 = await load(store, "s1"), await load(store, "s2")
    assert s1 is not None and s2 is not None
    assert (s1.error, s1.row_version) == (None, 0)  # rolled back with the batch
    assert (s2.error, s2.row_version) == ("winner", 1)


async def test_claim_inboxes_returns_only_the_new_ids(any_store: SqlSagaStore) -> None:
    store = any_store
    async with store.transaction() as tx:
        assert await tx.claim_inboxes({"m1": "s1", "m2": "s1"}, "engine") == {"m1", "m2"}
    async with store.transaction() as tx:
        assert await tx.claim_inboxes({"m2": "s1", "m3": "s2", "m1": "s1"}, "engine") == {"m3"}
        assert await tx.claim_inboxes({}, "engine") == set()
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(inbox.c.message_id, inbox.c.saga_id))
        assert sorted(rows) == [("m1", "s1"), ("m2", "s1"), ("m3", "s2")]


async def test_locked_sagas_make_a_second_writer_wait(pg_store: SqlSagaStore) -> None:
    """Row locks are PostgreSQL's (SQLite serialises whole write transactions)."""
    store = pg_store
    await insert(store, "s1")
    released = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with store.transaction() as tx:
            (image,) = (await tx.lock_sagas(["s1"])).values()
            await released.wait()
            image.error = "first"
            await tx.save_saga(image)
            order.append("holder committed")

    async def second() -> None:
        async with store.transaction() as tx:
            (image,) = (await tx.lock_sagas(["s1"])).values()  # waits for the holder
            order.append(f"second read {image.error}")
            image.error = "second"
            await tx.save_saga(image)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0.2)
    waiting = asyncio.create_task(second())
    await asyncio.sleep(0.3)
    assert order == []  # still waiting on the lock
    released.set()
    await asyncio.gather(first, waiting)
    assert order == ["holder committed", "second read first"]
    final = await load(store, "s1")
    assert final is not None and (final.error, final.row_version) == ("second", 2)
