"""Scheduled pruning (engine/retention.py): the age syntax, the batch loop, the
engine's outbox and inbox rules on SQLite and PostgreSQL, the daemons' wiring, and
what a duplicate reply does once its inbox row is gone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from engine import daemon
from engine.database import create_engine
from engine.retention import Pruner, PruneRule, format_age, parse_age
from engine.settings import Settings
from engine.states import SagaStatus
from engine.store.schema import inbox, outbox
from engine.store.sql import SqlSagaStore
from engine.worker.barrier import SqlBarrier
from tests.e2e import fresh_database
from tests.services import service_url
from tests.test_prune import Script

DAY = timedelta(days=1)


# -- ages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("2w", 14 * 86400)],
)
def test_ages_with_a_unit(text: str, seconds: int) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)
    assert parse_age(format_age(parse_age(text))) == parse_age(text)


@pytest.mark.parametrize("text", ["", "30", "3x", "-5d", "d", "1.5.2h", "30 days", "1h30m"])
def test_a_bad_age_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"not an age: .*use e\.g\. 30d, 12h, 90m or 3600s"):
        parse_age(text)


def test_a_bare_number_is_seconds_only_where_allowed() -> None:
    assert parse_age("90", bare_seconds=True) == timedelta(seconds=90)
    assert parse_age("1.5h", bare_seconds=True) == timedelta(minutes=90)
    assert format_age(timedelta(minutes=90)) == "90m"
    assert format_age(timedelta(seconds=1.5)) == "1.5s"


def test_settings_read_retentions_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.outbox_retention == timedelta(hours=1)
    assert defaults.inbox_retention == 7 * DAY
    assert defaults.barrier_retention == 30 * DAY
    assert defaults.prune_interval == timedelta(seconds=60)
    assert defaults.prune_batch == 5000
    monkeypatch.setenv("SAGA_OUTBOX_RETENTION", "0")
    monkeypatch.setenv("SAGA_INBOX_RETENTION", "14d")
    monkeypatch.setenv("SAGA_PRUNE_INTERVAL", "300")
    settings = Settings()
    assert settings.outbox_retention == timedelta(0)
    assert settings.inbox_retention == 14 * DAY
    assert settings.prune_interval == timedelta(minutes=5)
    monkeypatch.setenv("SAGA_BARRIER_RETENTION", "3x")
    with pytest.raises(ValueError, match="not an age"):
        Settings()
    monkeypatch.setenv("SAGA_BARRIER_RETENTION", "-60")
    with pytest.raises(ValueError):
        Settings()


# -- the pruner ------------------------------------------------------------------------


class Table:
    """Rows with ages, pruned like a real table would be, one batch per call."""

    def __init__(self, ages: list[timedelta], now: datetime) -> None:
        self.born = [now - age for age in ages]
        self.calls: list[tuple[datetime, int]] = []

    async def prune(self, before: datetime, limit: int) -> int:
        self.calls.append((before, limit))
        old = [b for b in self.born if b < before][:limit]
        for b in old:
            self.born.remove(b)
        return len(old)


NOW = datetime(2024, 6, 1, tzinfo=UTC)


async def test_a_round_deletes_in_batches_until_one_comes_back_short() -> None:
    table = Table([2 * DAY] * 7 + [timedelta(hours=1)] * 3, NOW)
    pruner = Pruner([PruneRule("t", DAY, table.prune)], batch=3, clock=lambda: NOW)
    assert await pruner.prune_once() == {"t": 7}
    assert table.calls == [(NOW - DAY, 3)] * 3
    assert len(table.born) == 3  # the young ones stay
    assert await pruner.prune_once() == {"t": 0}
    assert pruner.pruned == {"t": 7}


async def test_a_round_stops_between_batches_when_asked() -> None:
    table = Table([2 * DAY] * 10, NOW)
    stop = asyncio.Event()

    async def prune(before: datetime, limit: int) -> int:
        stop.set()  # a SIGTERM arrives during the first batch
        return await table.prune(before, limit)

    pruner = Pruner([PruneRule("t", DAY, prune)], batch=2, clock=lambda: NOW)
    assert await pruner.prune_once(stop) == {"t": 2}


async def test_a_failing_round_is_logged_and_tried_again_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[float] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def prune(before: datetime, limit: int) -> int:
        calls.append(loop.time())
        if len(calls) == 1:
            raise ConnectionError("database down")
        stop.set()
        return 0

    pruner = Pruner([PruneRule("t", DAY, prune)], interval=0.05)
    with caplog.at_level(logging.WARNING, "saga.retention"):
        await asyncio.wait_for(pruner.run(stop), timeout=5)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.045  # waited out the interval: no hot loop
    assert "pruning failed, trying again in 0.05s: database down" in caplog.text


async def test_the_daemons_build_their_pruners_from_the_settings(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    db = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    store = SqlSagaStore(db)
    try:
        pruner = daemon.engine_pruner(store, Settings())
        assert pruner is not None
        assert [(r.table, r.keep) for r in pruner.rules] == [
            ("outbox", timedelta(hours=1)),
            ("inbox", 7 * DAY),
        ]
        assert pruner.describe() == (
            "pruning outbox after 1h, inbox after 7d, every 60s in batches of 5000"
        )
        only_inbox = daemon.engine_pruner(store, Settings(outbox_retention=0))
        assert only_inbox is not None and [r.table for r in only_inbox.rules] == ["inbox"]
        assert daemon.engine_pruner(store, Settings(prune_interval=0)) is None
        off = Settings(outbox_retention=0, inbox_retention=0)
        assert daemon.engine_pruner(store, off) is None

        worker = daemon.barrier_pruner(SqlBarrier(db), "payment", Settings(prune_batch=10))
        assert worker is not None and worker.batch == 10
        assert [(r.table, r.keep) for r in worker.rules] == [("barrier", 30 * DAY)]
        assert (
            daemon.barrier_pruner(SqlBarrier(db), "payment", Settings(barrier_retention=0)) is None
        )
        with caplog.at_level(logging.WARNING, "saga.daemon"):
            daemon.barrier_pruner(SqlBarrier(db), "payment", Settings(barrier_retention="2h"))
        assert "runs its effect twice" in caplog.text
    finally:
        await db.dispose()


async def test_the_pruner_runs_alongside_the_daemon_and_stops_with_it() -> None:
    rounds = 0
    enough = asyncio.Event()

    async def prune(before: datetime, limit: int) -> int:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            enough.set()
        return 0

    pruner = Pruner([PruneRule("t", DAY, prune)], interval=0.01)
    main_done = asyncio.Event()

    async def main() -> None:
        await enough.wait()  # the daemon's loops run while the pruner goes round
        main_done.set()

    await asyncio.wait_for(daemon._alongside(main, pruner)(), timeout=5)
    assert main_done.is_set()
    stopped_at = rounds
    await asyncio.sleep(0.05)
    assert rounds == stopped_at  # no pruning after the daemon's loops ended


# -- the engine's rules on a real store ---------------------------------------------------


async def _count(store: SqlSagaStore, table: object, condition: object = None) -> int:
    query = select(func.count()).select_from(table)  # type: ignore[arg-type]
    if condition is not None:
        query = query.where(condition)  # type: ignore[arg-type]
    async with store.engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


async def test_sent_outbox_rows_go_after_their_retention_unsent_ones_never(
    any_store: SqlSagaStore,
) -> None:
    script = Script(any_store)
    for _ in range(3):
        await script.saga(SagaStatus.COMPLETED)  # 3 x 3 commands, sent at LONG_AGO
    script.now = datetime.now(UTC)
    await script.saga(SagaStatus.COMPLETED)  # 3 sent just now
    await script.start()  # one unsent, old
    async with any_store.engine.begin() as conn:
        await conn.execute(
            update(outbox).where(outbox.c.sent_at.is_(None)).values(created_at=script.now - DAY)
        )
    assert await _count(any_store, outbox) == 13
    rule = PruneRule("outbox", timedelta(hours=1), any_store.prune_sent_outbox)
    removed = await Pruner([rule], batch=4).prune_once()
    assert removed == {"outbox": 9}
    assert await _count(any_store, outbox, outbox.c.sent_at.is_(None)) == 1
    assert await _count(any_store, outbox) == 4


async def test_inbox_rows_go_after_their_retention(any_store: SqlSagaStore) -> None:
    script = Script(any_store)
    await script.saga(SagaStatus.COMPLETED)  # 3 replies, processed "now" (real time)
    async with any_store.engine.begin() as conn:
        await conn.execute(
            update(inbox)
            .where(inbox.c.message_id.in_(select(inbox.c.message_id).limit(2)))
            .values(processed_at=datetime.now(UTC) - 8 * DAY)
        )
    rule = PruneRule("inbox", 7 * DAY, any_store.prune_inbox)
    assert await Pruner([rule], batch=1).prune_once() == {"inbox": 2}
    assert await _count(any_store, inbox) == 1


async def test_a_duplicate_reply_after_its_inbox_row_was_pruned_changes_nothing(
    any_store: SqlSagaStore,
) -> None:
    """The documented limit of the inbox retention: past it, a duplicate is no longer
    recognised by its id, but its attempt token no longer matches what the saga waits
    for, so it is recorded as ignored and the saga does not move."""
    script = Script(any_store)
    saga_id = await script.start()
    first = await script.reply(saga_id)  # reserve_inventory succeeded: the charge is next
    await script.relay()
    assert not await script.engine.handle_reply(first)  # the inbox knows it
    before = await script.client.get(saga_id)

    later = datetime.now(UTC) + 8 * DAY
    rule = PruneRule("inbox", 7 * DAY, any_store.prune_inbox)
    assert await Pruner([rule], clock=lambda: later).prune_once() == {"inbox": 1}

    assert await script.engine.handle_reply(first)  # not recognised by the inbox now
    after = await script.client.get(saga_id)
    assert after.status is SagaStatus.RUNNING
    assert after.steps == before.steps
    assert [h.event for h in after.history[len(before.history) :]] == ["reply_ignored"]
    assert await _count(any_store, outbox, outbox.c.sent_at.is_(None)) == 0  # nothing sent


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        yield url


@pytest.mark.integration
async def test_engine_replicas_pruning_at_once_share_the_rows(pg_url: str) -> None:
    databases = [create_engine(pg_url) for _ in range(3)]
    try:
        stores = [SqlSagaStore(d) for d in databases]
        script = Script(stores[0])
        for _ in range(20):
            await script.saga(SagaStatus.COMPLETED)
        sent = await _count(stores[0], outbox)
        pruners = [
            Pruner([PruneRule("outbox", timedelta(hours=1), s.prune_sent_outbox)], batch=5)
            for s in stores
        ]
        results = await asyncio.gather(*(p.prune_once() for p in pruners))
        assert sum(r["outbox"] for r in results) == sent == 60
        assert await _count(stores[0], outbox) == 0
    finally:
        for d in databases:
            await d.dispose()


@pytest.mark.integration
async def test_outbox_rows_locked_by_another_transaction_are_skipped_not_waited_for(
    pg_url: str,
) -> None:
    db = create_engine(pg_url)
    try:
        store = SqlSagaStore(db)
        await Script(store).saga(SagaStatus.COMPLETED)
        rule = PruneRule("outbox", timedelta(hours=1), store.prune_sent_outbox)
        async with db.begin() as holder:
            first = await holder.scalar(
                select(outbox.c.id).order_by(outbox.c.id).limit(1).with_for_update()
            )
            removed = await asyncio.wait_for(Pruner([rule]).prune_once(), timeout=5)
            assert removed == {"outbox": 2}
        assert await _count(store, outbox, outbox.c.id == first) == 1
        assert await Pruner([rule]).prune_once() == {"outbox": 1}
    finally:
        await db.dispose()
