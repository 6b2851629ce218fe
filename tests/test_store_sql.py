from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import BaseModel
from sqlalchemy import event, func, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.database import check_schema, create_engine, current_revisions, head_revisions, upgrade
from engine.definition import Compensation, Saga, Step
from engine.errors import ConcurrencyConflict, DatabaseError
from engine.messages import Envelope, MessageKind, Outcome, decode
from engine.model import Awaiting, HistoryEntry, OutboxMessage, SagaState, Timer, TimerKind
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus, StepStatus
from engine.store.base import write_transition
from engine.store.schema import history, inbox, metadata, outbox, timers
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from workers import inventory, payment, shipment

T0 = datetime(2024, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)


class Inp(BaseModel):
    n: int


SAGA = Saga(
    name="demo",
    version=2,
    input=Inp,
    steps=[
        Step(
            name=name,
            participant="p",
            command=lambda ctx: {"n": 1},
            compensation=Compensation(f"undo_{name}", lambda ctx: {}),
        )
        for name in ("first", "second")
    ],
)


def started(saga_id: str, at: datetime = T0, saga: Saga = SAGA) -> tuple[SagaState, Transition]:
    state = new_saga(saga, saga_id, {"n": 1}, at)
    tr = Transition(saga, state, now=at, topology=Topology())
    tr.start()
    return state, tr


async def insert(store: SqlSagaStore, saga_id: str, at: datetime = T0, **changes: Any) -> SagaState:
    state, tr = started(saga_id, at)
    for key, value in changes.items():
        setattr(state, key, value)
    async with store.transaction() as tx:
        await write_transition(tx, state, tr.messages, tr.history, new=True)
    return state


async def load(store: SqlSagaStore, saga_id: str) -> SagaState | None:
    async with store.transaction() as tx:
        return await tx.load_saga(saga_id)


# -- saga images -----------------------------------------------------------------------


async def test_insert_and_load_round_trip(store: SqlSagaStore) -> None:
    state = await insert(store, "s1", trace_id="ab" * 16)
    state.steps["first"].reply = {"deep": {"list": [1, 2]}}
    loaded = await load(store, "s1")
    assert loaded is not None
    assert loaded.awaiting == Awaiting("first", MessageKind.COMMAND, 1)
    assert loaded.timer == Timer(TimerKind.STEP_TIMEOUT, "first", 1, T0 + timedelta(seconds=30))
    assert loaded.timer.due_at.tzinfo is not None
    assert loaded.created_at == T0 and loaded.updated_at == T0
    assert (loaded.name, loaded.version, loaded.input) == ("demo", 2, {"n": 1})
    assert loaded.trace_id == "ab" * 16
    assert loaded.row_version == 0
    assert loaded.steps["first"].status is StepStatus.DISPATCHED
    assert loaded.steps["first"].started_at == T0
    assert loaded.steps["second"] == dataclasses.replace(state.steps["second"])
    assert [s.name for s in loaded.ordered_steps()] == ["first", "second"]


async def test_load_of_a_missing_saga_is_none(store: SqlSagaStore) -> None:
    assert await load(store, "nope") is None
    assert await store.get_saga("nope") is None


async def test_save_writes_changes_and_bumps_row_version(store: SqlSagaStore) -> None:
    await insert(store, "s1")
    async with store.transaction() as tx:
        state = await tx.load_saga("s1")
        assert state is not None
        state.status = SagaStatus.COMPENSATING
        state.error = "boom"
        state.awaiting = None
        state.timer = Timer(TimerKind.RETRY, "first", 1, T0 + timedelta(seconds=5))
        state.steps["first"].status = StepStatus.PENDING
        state.steps["first"].reply = {"ok": True}
        state.steps["first"].finished_at = T0 + timedelta(seconds=1)
        await tx.save_saga(state)
        assert state.row_version == 1
    again = await load(store, "s1")
    assert again is not None
    assert again.row_version == 1
    assert (again.status, again.error, again.awaiting) == (SagaStatus.COMPENSATING, "boom", None)
    assert again.timer == Timer(TimerKind.RETRY, "first", 1, T0 + timedelta(seconds=5))
    assert again.steps["first"].reply == {"ok": True}
    assert again.steps["first"].finished_at == T0 + timedelta(seconds=1)
    assert again.steps["first"].status is StepStatus.PENDING


async def test_clearing_the_timer_deletes_its_row(store: SqlSagaStore) -> None:
    await insert(store, "s1")
    async with store.transaction() as tx:
        state = await tx.load_saga("s1")
        assert state is not None
        state.timer = None
        await tx.save_saga(state)
    loaded = await load(store, "s1")
    assert loaded is not None and loaded.timer is None
    async with store.transaction() as tx:
        assert await tx.due_timers(T0 + timedelta(days=1), 10) == []


async def test_timer_rows_follow_the_steps_one_statement_per_move(
    any_store: SqlSagaStore,
) -> None:
    """A timer that passes to the next step (a reply, in a line of steps) is one
    UPDATE of its row, as when a saga had one timer row; the rows are every step's
    timer whatever moves, appears and goes, in one save."""
    store = any_store
    await insert(store, "s1")
    later = T0 + timedelta(seconds=60)
    moves: list[dict[str, Timer]] = [
        {"second": Timer(TimerKind.STEP_TIMEOUT, "second", 1, later)},  # the next step
        {  # another appears beside it, which changed
            "first": Timer(TimerKind.RETRY, "first", 2, later),
            "second": Timer(TimerKind.RETRY, "second", 1, T0),
        },
        {"second": Timer(TimerKind.STEP_TIMEOUT, "second", 2, later)},  # one goes
        {"first": Timer(TimerKind.DELAY, "first", 3, T0)},  # one goes, one comes
        {},
    ]
    written: list[list[str]] = []

    def on_timers(*args: Any) -> None:
        verb = str(args[2]).split(None, 1)[0].upper()
        if "saga_timers" in str(args[2]) and verb != "SELECT":
            written[-1].append(verb)

    event.listen(store.engine.sync_engine, "before_cursor_execute", on_timers)
    try:
        for expected in moves:
            async with store.transaction() as tx:
                state = await tx.load_saga("s1")
                assert state is not None
                for st in state.steps.values():
                    st.timer = expected.get(st.name)
                written.append([])
                await tx.save_saga(state)
            async with store.engine.connect() as conn:
                rows = await conn.execute(select(timers).order_by(timers.c.step))
                assert {
                    r.step: Timer(TimerKind(r.kind), r.step, r.attempt, r.due_at) for r in rows
                } == expected
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", on_timers)
    assert written == [
        ["UPDATE"],
        ["INSERT", "UPDATE"],
        ["DELETE", "UPDATE"],
        ["UPDATE"],
        ["DELETE"],
    ]


async def test_save_with_a_stale_row_version_conflicts(store: SqlSagaStore) -> None:
    await insert(store, "s1")
    stale = await load(store, "s1")
    async with store.transaction() as tx:
        fresh = await tx.load_saga("s1")
        assert fresh is not None
        fresh.error = "winner"
        await tx.save_saga(fresh)
    assert stale is not None
    stale.error = "loser"
    with pytest.raises(ConcurrencyConflict, match="s1 was advanced by another writer"):
        async with store.transaction() as tx:
            await tx.save_saga(stale)
    final = await load(store, "s1")
    assert final is not None
    assert (final.error, final.row_version) == ("winner", 1)


async def test_conflict_rolls_back_the_whole_transaction(store: SqlSagaStore) -> None:
    await insert(store, "s1")
    stale = await load(store, "s1")
    async with store.transaction() as tx:
        fresh = await tx.load_saga("s1")
        assert fresh is not None
        await tx.save_saga(fresh)
    assert stale is not None
    entry = HistoryEntry(T0, "should_vanish")
    with pytest.raises(ConcurrencyConflict):
        async with store.transaction() as tx:
            await tx.claim_inbox("m-conflict", "engine")
            await write_transition(tx, stale, [], [entry])
    async with store.transaction() as tx:
        assert await tx.claim_inbox("m-conflict", "engine") is True
    detail = await store.get_saga("s1")
    assert detail is not None
    assert "should_vanish" not in [h.event for h in detail.history]


# -- inbox, timers, outbox ----------------------------------------------------------------


async def test_claim_inbox_is_true_once(store: SqlSagaStore) -> None:
    async with store.transaction() as tx:
        assert await tx.claim_inbox("m1", "engine") is True
        assert await tx.claim_inbox("m1", "engine") is False
        assert await tx.claim_inbox("m2", "engine") is True
    async with store.transaction() as tx:
        assert await tx.claim_inbox("m1", "engine") is False
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(inbox))).scalar() == 2


async def test_inbox_claim_rolls_back_with_its_transaction(store: SqlSagaStore) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            assert await tx.claim_inbox("m1", "engine")
            raise RuntimeError("processing failed")
    async with store.transaction() as tx:
        assert await tx.claim_inbox("m1", "engine") is True


async def test_due_timers_returns_only_due_ones_earliest_first(store: SqlSagaStore) -> None:
    await insert(store, "late", at=T0 + timedelta(seconds=20))  # due at T0+50s
    await insert(store, "early", at=T0)  # due at T0+30s
    await insert(store, "middle", at=T0 + timedelta(seconds=10))  # due at T0+40s
    async with store.transaction() as tx:
        assert await tx.due_timers(T0 + timedelta(seconds=29), 10) == []
        due = await tx.due_timers(T0 + timedelta(seconds=40), 10)
        assert [d.saga_id for d in due] == ["early", "middle"]
        assert due[0].timer == Timer(TimerKind.STEP_TIMEOUT, "first", 1, T0 + timedelta(seconds=30))
        assert [d.saga_id for d in await tx.due_timers(T0 + timedelta(hours=1), 2)] == [
            "early",
            "middle",
        ]
        assert len(await tx.due_timers(T0 + timedelta(hours=1), 10)) == 3


async def test_last_sent_is_when_the_broker_took_the_sagas_latest_message(
    store: SqlSagaStore,
) -> None:
    # A timeout runs from when its message went out, if no engine relayed it in time.
    await insert(store, "s1")
    async with store.transaction() as tx:
        assert await tx.has_unsent("s1")
        assert await tx.last_sent("s1") is None
        (row,) = await tx.claim_outbox(10)
        await tx.mark_sent([row.id], T0 + timedelta(seconds=5))
    async with store.transaction() as tx:
        assert not await tx.has_unsent("s1")
        assert await tx.last_sent("s1") == T0 + timedelta(seconds=5)
        assert await tx.last_sent("other") is None


async def test_held_timeouts_are_not_returned_and_do_not_fill_the_batch(
    any_store: SqlSagaStore,
) -> None:
    # Three step timeouts due first, then a retry and a compensation timeout: the
    # watermark holds every timeout due after T0+35s.
    for n in range(3):
        await insert(any_store, f"held-{n}", at=T0 + timedelta(seconds=10 + n))  # due T0+40s..
    retry = Timer(TimerKind.RETRY, "first", 1, T0 + timedelta(seconds=50))
    await insert(any_store, "retry", timer=retry)
    undo = Timer(TimerKind.COMPENSATION_TIMEOUT, "first", 1, T0 + timedelta(seconds=55))
    await insert(any_store, "undo", timer=undo)
    await insert(any_store, "covered", at=T0)  # due T0+30s: the evidence covers it
    now = T0 + timedelta(minutes=1)
    async with any_store.transaction() as tx:
        due = await tx.due_timers(now, 2, timeouts_due_by=T0 + timedelta(seconds=35))
        assert [d.saga_id for d in due] == ["covered", "retry"]
        due = await tx.due_timers(now, 10, timeouts_due_by=T0 + timedelta(seconds=40))
        assert [d.saga_id for d in due] == ["covered", "held-0", "retry"]
        # A bound at or past now holds nothing.
        assert len(await tx.due_timers(now, 10, timeouts_due_by=now)) == 6


async def test_outbox_is_claimed_in_order_and_marked_sent(store: SqlSagaStore) -> None:
    a = await insert(store, "a")
    b = await insert(store, "b")
    async with store.transaction() as tx:
        rows = await tx.claim_outbox(10)
        assert [r.key for r in rows] == ["a", "b"]
        assert rows[0].id < rows[1].id
        assert rows[0].destination == "saga.commands.p"
        envelope = decode(rows[0].body)
        assert (envelope.saga_id, envelope.step, envelope.kind) == (
            a.id,
            "first",
            MessageKind.COMMAND,
        )
        assert [r.key for r in await tx.claim_outbox(1)] == ["a"]
        await tx.mark_sent([rows[0].id], T0)
    async with store.transaction() as tx:
        rest = await tx.claim_outbox(10)
        assert [r.key for r in rest] == [b.id]
        await tx.mark_sent([r.id for r in rest], T0)
        await tx.mark_sent([], T0)
    async with store.transaction() as tx:
        assert await tx.claim_outbox(10) == []


async def test_outbox_keeps_headers(store: SqlSagaStore) -> None:
    envelope = Envelope(
        saga_id="x",
        saga_name="demo",
        saga_version=2,
        step="first",
        kind=MessageKind.COMMAND,
        name="first",
        attempt=1,
        headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    async with store.transaction() as tx:
        await tx.add_outbox([OutboxMessage("dest", "x", envelope)])
    async with store.transaction() as tx:
        (row,) = await tx.claim_outbox(10)
    assert row.headers == envelope.headers
    assert decode(row.body) == envelope


async def test_unsent_rows_survive_a_rolled_back_relay(store: SqlSagaStore) -> None:
    await insert(store, "a")
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            rows = await tx.claim_outbox(10)
            await tx.mark_sent([r.id for r in rows], T0)
            raise RuntimeError("publish failed after mark")
    async with store.transaction() as tx:
        assert len(await tx.claim_outbox(10)) == 1


# -- read side ----------------------------------------------------------------------------


async def test_list_sagas_filters_and_orders_newest_first(store: SqlSagaStore) -> None:
    other = Saga(name="other", version=1, input=Inp, steps=list(SAGA.steps))
    for i in range(5):
        await insert(store, f"d{i}", at=T0 + timedelta(minutes=i))
    state, tr = started("o1", T0 + timedelta(minutes=10), saga=other)
    async with store.transaction() as tx:
        await write_transition(tx, state, tr.messages, tr.history, new=True)
    async with store.transaction() as tx:
        s = await tx.load_saga("d1")
        assert s is not None
        s.status = SagaStatus.COMPLETED
        await tx.save_saga(s)

    assert [s.id for s in await store.list_sagas()] == ["o1", "d4", "d3", "d2", "d1", "d0"]
    assert [s.id for s in await store.list_sagas(limit=2)] == ["o1", "d4"]
    assert [s.id for s in await store.list_sagas(name="demo", limit=3)] == ["d4", "d3", "d2"]
    completed = await store.list_sagas(status=SagaStatus.COMPLETED)
    assert [(s.id, s.status, s.version) for s in completed] == [("d1", SagaStatus.COMPLETED, 2)]
    assert [s.id for s in await store.list_sagas(status=SagaStatus.RUNNING, name="other")] == ["o1"]
    assert await store.list_sagas(status=SagaStatus.PARKED) == []
    assert await store.count_by_status() == {SagaStatus.RUNNING: 5, SagaStatus.COMPLETED: 1}


async def test_get_saga_returns_steps_and_history(store: SqlSagaStore) -> None:
    state, tr = started("s1")
    async with store.transaction() as tx:
        await write_transition(tx, state, tr.messages, tr.history, new=True)
    later = T0 + timedelta(seconds=2)
    async with store.transaction() as tx:
        loaded = await tx.load_saga("s1")
        assert loaded is not None
        tr = Transition(SAGA, loaded, now=later, topology=Topology())
        envelope = decode((await tx.claim_outbox(1))[0].body)
        assert tr.on_reply(envelope.reply(Outcome.SUCCESS, payload={"made": 1}))
        await write_transition(tx, loaded, tr.messages, tr.history)
    detail = await store.get_saga("s1")
    assert detail is not None
    assert (detail.id, detail.name, detail.version, detail.status) == (
        "s1",
        "demo",
        2,
        SagaStatus.RUNNING,
    )
    assert detail.input == {"n": 1}
    assert [(s.name, s.position, s.status, s.attempts) for s in detail.steps] == [
        ("first", 0, StepStatus.SUCCEEDED, 1),
        ("second", 1, StepStatus.DISPATCHED, 1),
    ]
    assert detail.steps[0].reply == {"made": 1}
    assert detail.steps[0].finished_at == later
    assert [(h.event, h.step, h.actor) for h in detail.history] == [
        ("started", None, "engine"),
        ("step_succeeded", "first", "engine"),
    ]
    assert detail.history[1].at == later
    assert detail.updated_at == later
    assert detail.created_at == T0


async def test_history_appends_in_order(store: SqlSagaStore) -> None:
    await insert(store, "s1")
    async with store.transaction() as tx:
        await tx.add_history(
            "s1",
            [HistoryEntry(T0, f"e{i}", "first", f"d{i}", actor="sagactl") for i in range(3)],
        )
        await tx.add_history("s1", [])
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(history.c.event, history.c.actor)
                .where(history.c.saga_id == "s1")
                .order_by(history.c.id)
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("started", "engine"),
        ("e0", "sagactl"),
        ("e1", "sagactl"),
        ("e2", "sagactl"),
    ]


async def test_outbox_message_ids_are_unique(store: SqlSagaStore) -> None:
    state, tr = started("s1")
    async with store.transaction() as tx:
        await write_transition(tx, state, tr.messages, tr.history, new=True)
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        async with store.transaction() as tx:
            await tx.add_outbox(tr.messages)
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(outbox))).scalar() == 1


# -- schema ------------------------------------------------------------------------------

ENGINE_TABLES = {t.name for t in metadata.sorted_tables}
EXAMPLE_METADATA = [inventory.metadata, payment.metadata, shipment.metadata]
EXAMPLE_TABLES = {t.name for m in EXAMPLE_METADATA for t in m.sorted_tables}


def _diff(connection: Connection, target: Any, tables: set[str]) -> list[Any]:
    """What autogenerate would change to make ``tables`` match ``target``."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        if type_ == "table":
            return name in tables
        table = getattr(obj, "table", None)
        return table is None or table.name in tables

    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": include}
    )
    return list(compare_metadata(context, target))


def _schema_diff(connection: Connection) -> list[Any]:
    return _diff(connection, metadata, ENGINE_TABLES)


async def test_migrations_and_schema_metadata_do_not_drift(db: AsyncEngine) -> None:
    async with db.connect() as conn:
        names = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        diffs = await conn.run_sync(_schema_diff)
    assert names >= ENGINE_TABLES
    assert {
        "saga_instances",
        "saga_steps",
        "saga_timers",
        "saga_history",
        "saga_outbox",
        "saga_inbox",
        "participant_barrier",
        "saga_dead_letters",
        "saga_deferred_replies",
        "saga_held_replies",
        "saga_served_definitions",
        "saga_keys",
    } == ENGINE_TABLES
    assert diffs == []


async def test_example_ledger_migration_matches_the_workers_tables(db: AsyncEngine) -> None:
    async with db.connect() as conn:
        diffs = await conn.run_sync(lambda c: _diff(c, EXAMPLE_METADATA, EXAMPLE_TABLES))
    assert {
        "inventory_stock",
        "inventory_reservations",
        "payment_accounts",
        "payment_ledger",
        "shipments",
    } == EXAMPLE_TABLES
    assert diffs == []


async def test_drift_check_detects_a_missing_index(db: AsyncEngine) -> None:
    async with db.begin() as conn:
        await conn.exec_driver_sql("DROP INDEX ix_saga_timers_due_at")
    async with db.connect() as conn:
        diffs = await conn.run_sync(_schema_diff)
    assert len(diffs) == 1
    assert diffs[0][0] == "add_index"
    assert diffs[0][1].name == "ix_saga_timers_due_at"


async def test_schema_check_reports_unmigrated_and_migrated(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert await current_revisions(engine) == set()
        with pytest.raises(DatabaseError, match="has no saga tables"):
            await check_schema(engine)
        await upgrade(engine, "0001")
        with pytest.raises(DatabaseError, match=r"is at revision \['0001'\]"):
            await check_schema(engine)
        await upgrade(engine)
        assert await current_revisions(engine) == head_revisions()
        await check_schema(engine)
    finally:
        await engine.dispose()


async def test_saving_an_image_loaded_in_an_earlier_transaction(store: SqlSagaStore) -> None:
    """save_saga must not rely on the image having been loaded in the same transaction."""
    await insert(store, "s1")
    image = await load(store, "s1")
    assert image is not None and image.timer is not None
    image.timer = Timer(TimerKind.RETRY, "first", 1, T0 + timedelta(seconds=3))
    image.steps["first"].status = StepStatus.PENDING
    async with store.transaction() as tx:
        await tx.save_saga(image)
    again = await load(store, "s1")
    assert again is not None
    assert again.timer == Timer(TimerKind.RETRY, "first", 1, T0 + timedelta(seconds=3))
    assert again.steps["first"].status is StepStatus.PENDING

    again.timer = None
    async with store.transaction() as tx:
        await tx.save_saga(again)
    cleared = await load(store, "s1")
    assert cleared is not None and cleared.timer is None
    async with store.transaction() as tx:
        assert await tx.due_timers(T0 + timedelta(days=1), 10) == []
