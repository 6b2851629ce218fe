"""No reply holds up another: replies whose saga is not visible are set aside and
retried on their own schedule, errors that are not transient are bounded, and the
dead-letter archive keeps what the database cannot store as it came.

The engine is driven here one batch or one scan at a time (no loops, a clock of the
test's own), on SQLite and on PostgreSQL; the same behaviour between real processes
over Kafka and RabbitMQ is in ``tests/faults/test_deferred.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from engine.database import create_engine, is_transient
from engine.deadletters import DeadLetterArchive
from engine.limits import storable
from engine.messages import Envelope, Outcome, encode
from engine.model import SagaState
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus, StepStatus
from engine.store.base import StoreTransaction, write_transition
from engine.store.schema import deferred_replies, inbox
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import DEAD_LETTER_ID, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.transport.memory import MemoryBroker, MemoryTransport
from sagas.order import place_order
from tests.helpers import FakeDelivery, order_input

TOPOLOGY = Topology()
PATIENCE = 10.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_engine(store: SqlSagaStore, clock: Clock, **settings: Any) -> Engine:
    options: dict[str, Any] = {
        "unknown_saga_patience": PATIENCE,
        "failure_attempts": 3,
        "failure_backoff": 0.01,
        **settings,
    }
    return Engine(
        store,
        MemoryTransport(MemoryBroker()),  # never connected: nothing here publishes
        SagaRegistry([place_order]),
        clock=clock,
        settings=EngineSettings(**options),
    )


@dataclass
class Pending:
    """A saga built but not committed, and the reply to its first command."""

    state: SagaState
    transition: Transition
    reply: Envelope

    async def commit(self, store: SqlSagaStore) -> None:
        async with store.transaction() as tx:
            await write_transition(
                tx, self.state, self.transition.messages, self.transition.history, new=True
            )


def pending_saga(saga_id: str, clock: Clock) -> Pending:
    state = new_saga(place_order, saga_id, order_input(), clock())
    transition = Transition(place_order, state, now=clock(), topology=TOPOLOGY)
    transition.start()
    (command,) = transition.messages
    reply = command.envelope.reply(Outcome.SUCCESS, payload={"reservation": f"r-{saga_id}"})
    return Pending(state, transition, reply)


def delivery(reply: Envelope, **headers: str) -> FakeDelivery:
    return FakeDelivery(Message(TOPOLOGY.replies, reply.saga_id, encode(reply), headers))


async def deferred_rows(store: SqlSagaStore) -> dict[str, Any]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(deferred_replies))
        return {r.message_id: r for r in rows}


async def reserve_status(store: SqlSagaStore, saga_id: str) -> StepStatus:
    detail = await store.get_saga(saga_id)
    assert detail is not None
    return next(s.status for s in detail.steps if s.name == "reserve_inventory")


# -- set aside, never held ---------------------------------------------------------------


async def test_a_batch_sets_unseen_replies_aside_and_acknowledges_everything(
    any_store: SqlSagaStore,
) -> None:
    clock = Clock()
    engine = make_engine(any_store, clock)
    visible = pending_saga("visible", clock)
    await visible.commit(any_store)
    late = pending_saga("late", clock)
    ghost = pending_saga("ghost", clock)
    batch = [
        delivery(late.reply, traceparent="00-abc"),
        delivery(visible.reply),
        delivery(ghost.reply),
    ]

    await engine.handle_deliveries(batch)

    assert [d.settled for d in batch] == [["ack"], ["ack"], ["ack"]]
    assert await reserve_status(any_store, "visible") is StepStatus.SUCCEEDED
    rows = await deferred_rows(any_store)
    assert set(rows) == {late.reply.message_id, ghost.reply.message_id}
    row = rows[late.reply.message_id]
    assert (row.saga_id, row.key, bytes(row.body)) == ("late", "late", encode(late.reply))
    assert row.headers == {"traceparent": "00-abc"}
    assert (row.attempts, row.failures) == (0, 0)
    assert (await any_store.stats()).replies_deferred == 2
    # The same reply redelivered before the scan took it: kept once, as it was.
    again = delivery(late.reply)
    await engine.handle_deliveries([again])
    assert again.settled == ["ack"]
    assert set(await deferred_rows(any_store)) == set(rows)

    # Still not visible: tried again later, with a growing pause.
    assert await engine.retry_deferred_replies() == 2
    first = (await deferred_rows(any_store))[late.reply.message_id]
    assert first.attempts == 1
    clock.advance(0.04)
    assert await engine.retry_deferred_replies() == 0  # not due yet (0.05s)
    clock.advance(0.02)
    assert await engine.retry_deferred_replies() == 2
    second = (await deferred_rows(any_store))[late.reply.message_id]
    assert second.attempts == 2
    assert second.next_attempt_at - clock() == timedelta(seconds=0.1)

    # Its saga commits late: the next scan applies the reply, once, and deletes it.
    await late.commit(any_store)
    clock.advance(1)
    assert await engine.retry_deferred_replies() == 2
    assert await reserve_status(any_store, "late") is StepStatus.SUCCEEDED
    assert set(await deferred_rows(any_store)) == {ghost.reply.message_id}
    assert engine.deferred_settled == 1
    async with any_store.engine.connect() as conn:
        claimed = await conn.scalar(
            select(func.count())
            .select_from(inbox)
            .where(inbox.c.message_id == late.reply.message_id)
        )
    assert claimed == 1
    # A copy arriving now is a plain duplicate.
    duplicate = delivery(late.reply)
    await engine.handle_deliveries([duplicate])
    assert duplicate.settled == ["ack"]
    assert set(await deferred_rows(any_store)) == {ghost.reply.message_id}

    # The ghost's saga never comes: after the patience it is a dead letter, deleted
    # in the same transaction, addressed back to the replies destination.
    clock.advance(PATIENCE)
    assert await engine.retry_deferred_replies() == 1
    assert await deferred_rows(any_store) == {}
    (letter,) = await any_store.list_dead_letters()
    assert letter.reason == "no saga ghost after 10s"
    assert letter.source == TOPOLOGY.replies
    assert letter.saga_id == "ghost"
    assert letter.body == encode(ghost.reply).decode()
    assert engine.deferred_settled == 2


async def test_a_deferred_reply_is_dead_lettered_on_time_however_it_was_backed_off(
    store: SqlSagaStore,
) -> None:
    clock = Clock()
    engine = make_engine(store, clock, unknown_saga_patience=1.0, deferred_backoff_max=5.0)
    ghost = pending_saga("ghost", clock)
    await engine.handle_deliveries([delivery(ghost.reply)])
    for _ in range(8):
        await engine.retry_deferred_replies()
        (row,) = (await deferred_rows(store)).values()
        assert row.next_attempt_at <= clock() + timedelta(seconds=1.0)
        clock.now = row.next_attempt_at
        if clock() >= ghost.state.created_at + timedelta(seconds=1.0):
            break
    assert await engine.retry_deferred_replies() == 1
    assert await deferred_rows(store) == {}
    (letter,) = await store.list_dead_letters()
    assert letter.reason == "no saga ghost after 1s"


@pytest.mark.integration
async def test_replicas_take_disjoint_deferred_replies(pg_store: SqlSagaStore) -> None:
    clock = Clock()
    engine = make_engine(pg_store, clock)
    ghosts = [pending_saga(f"ghost-{i}", clock) for i in range(4)]
    await engine.handle_deliveries([delivery(g.reply) for g in ghosts])
    async with pg_store.transaction() as first:
        mine = await first.due_deferred_replies(clock(), 2)
        async with pg_store.transaction() as second:
            theirs = await second.due_deferred_replies(clock(), 10)
    assert len(mine) == 2
    assert len(theirs) == 2
    assert {r.message_id for r in mine}.isdisjoint(r.message_id for r in theirs)


# -- bounded failures --------------------------------------------------------------------


class _FakeOrig(Exception):
    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _db_error(sqlstate: str, cls: type[DBAPIError] = DBAPIError) -> DBAPIError:
    return cls("INSERT ...", {}, _FakeOrig(f"error {sqlstate}", sqlstate))


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError("connection refused"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (OperationalError("SELECT 1", {}, Exception("database is locked")), True),
        (_db_error("08006"), True),  # connection failure
        (_db_error("40001"), True),  # serialization failure
        (_db_error("40P01"), True),  # deadlock
        (_db_error("53300"), True),  # too many connections
        (_db_error("57P01"), True),  # admin shutdown
        (_db_error("58030"), True),  # I/O error
        (_db_error("22001", DataError), False),  # value too long
        (_db_error("22021", DataError), False),  # NUL in text
        (_db_error("23505", IntegrityError), False),  # unique violation
        # The database's word wins over the wrapper's class.
        (_db_error("22001", OperationalError), False),
        (ValueError("a bug"), False),
        (KeyError("a bug"), False),
    ],
)
def test_errors_are_transient_only_when_they_can_pass(
    error: BaseException, transient: bool
) -> None:
    assert is_transient(error) is transient


def test_an_invalidated_connection_and_a_wrapped_cause_are_transient() -> None:
    invalidated = DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert is_transient(invalidated)
    try:
        try:
            raise ConnectionResetError("peer hung up")
        except ConnectionResetError as cause:
            raise RuntimeError("apply failed") from cause
    except RuntimeError as wrapped:
        assert is_transient(wrapped)


@pytest.mark.integration
async def test_real_postgresql_errors_are_classified(pg_store: SqlSagaStore) -> None:
    with pytest.raises(DBAPIError) as too_long:
        async with pg_store.transaction() as tx:
            await tx.claim_inboxes({"x" * 40: None}, "engine")
    assert not is_transient(too_long.value)
    with pytest.raises(DBAPIError) as nul:
        async with pg_store.transaction() as tx:
            await tx.claim_inboxes({"a\x00b": None}, "engine")
    assert not is_transient(nul.value)
    unreachable = create_engine("postgresql://nobody:secret@127.0.0.1:1/none")
    try:
        with pytest.raises(Exception) as refused:
            async with unreachable.connect():
                pass
        assert is_transient(refused.value)
    finally:
        await unreachable.dispose()


def test_storable_shows_nul_instead_of_refusing_it() -> None:
    assert storable("a\x00b\x00") == "a\\x00b\\x00"
    assert storable("plain") == "plain"


class PoisonStore(SqlSagaStore):
    """A store that fails any transaction claiming one of ``poisoned`` message ids,
    with ``error``; counts those failures."""

    def __init__(self, inner: SqlSagaStore, error: BaseException) -> None:
        super().__init__(inner.engine)
        self.error = error
        self.poisoned: set[str] = set()
        self.failures = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with super().transaction() as tx:
            yield _PoisonTransaction(tx, self)


class _PoisonTransaction:
    def __init__(self, tx: StoreTransaction, store: PoisonStore) -> None:
        self._tx = tx
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def claim_inboxes(self, messages: Mapping[str, str | None], consumer: str) -> set[str]:
        if self._store.poisoned & set(messages):
            self._store.failures += 1
            raise self._store.error
        return await self._tx.claim_inboxes(messages, consumer)


async def test_a_reply_the_database_refuses_is_dead_lettered_and_the_next_is_applied(
    any_store: SqlSagaStore,
) -> None:
    clock = Clock()
    poison_store = PoisonStore(any_store, _db_error("22021", DataError))
    engine = make_engine(poison_store, clock)
    bad, good = pending_saga("bad", clock), pending_saga("good", clock)
    await bad.commit(any_store)
    await good.commit(any_store)
    poison_store.poisoned.add(bad.reply.message_id)
    batch = [delivery(bad.reply), delivery(good.reply)]

    await engine.handle_deliveries(batch)

    # The batch failed once, then the bad reply alone three times (the bound).
    assert poison_store.failures == 1 + 3
    (settled,) = batch[0].settled
    assert settled.startswith("dead_letter: not applied after 3 attempts: _FakeOrig")
    assert "error 22021" in settled
    assert batch[1].settled == ["ack"]
    assert await reserve_status(any_store, "good") is StepStatus.SUCCEEDED
    assert await reserve_status(any_store, "bad") is StepStatus.DISPATCHED


async def test_a_transient_error_is_never_dead_lettered(any_store: SqlSagaStore) -> None:
    clock = Clock()
    poison_store = PoisonStore(any_store, ConnectionResetError("the database went away"))
    engine = make_engine(poison_store, clock, error_backoff=0.01)
    saga = pending_saga("s", clock)
    await saga.commit(any_store)
    poison_store.poisoned.add(saga.reply.message_id)
    tries = [delivery(saga.reply) for _ in range(5)]
    for attempt in tries:  # the broker redelivers what was handed back
        await engine.handle_deliveries([attempt])
    assert [d.settled for d in tries] == [["nack"]] * 5
    poison_store.poisoned.clear()
    last = delivery(saga.reply)
    await engine.handle_deliveries([last])
    assert last.settled == ["ack"]
    assert await reserve_status(any_store, "s") is StepStatus.SUCCEEDED
    assert await any_store.list_dead_letters() == []


async def test_a_deferred_reply_the_database_refuses_is_dead_lettered_after_bounded_tries(
    any_store: SqlSagaStore,
) -> None:
    clock = Clock()
    poison_store = PoisonStore(any_store, _db_error("22001", DataError))
    engine = make_engine(poison_store, clock)
    bad, good = pending_saga("bad", clock), pending_saga("good", clock)
    await engine.handle_deliveries([delivery(bad.reply), delivery(good.reply)])
    assert len(await deferred_rows(any_store)) == 2
    await bad.commit(any_store)
    await good.commit(any_store)
    poison_store.poisoned.add(bad.reply.message_id)

    # The batch fails, then each alone: the good one is applied, the bad one counted.
    assert await engine.retry_deferred_replies() == 2
    assert await reserve_status(any_store, "good") is StepStatus.SUCCEEDED
    rows = await deferred_rows(any_store)
    assert set(rows) == {bad.reply.message_id}
    assert rows[bad.reply.message_id].failures == 1
    assert "error 22001" in rows[bad.reply.message_id].last_error
    for _ in range(2):
        clock.advance(0.01)
        assert await engine.retry_deferred_replies() == 1
    assert await deferred_rows(any_store) == {}
    (letter,) = await any_store.list_dead_letters()
    assert letter.reason.startswith("not applied after 3 attempts: _FakeOrig: error 22001")
    assert letter.source == TOPOLOGY.replies
    assert letter.saga_id == "bad"
    assert await reserve_status(any_store, "bad") is StepStatus.DISPATCHED


# -- the dead-letter archive -------------------------------------------------------------


def _letter(reason: str, **headers: str) -> FakeDelivery:
    return FakeDelivery(
        Message(
            TOPOLOGY.dead_letters,
            "key\x00",
            b'{"not": "an envelope"}',
            {DEAD_LETTER_REASON: reason, DEAD_LETTER_SOURCE: "saga.re\x00plies", **headers},
        )
    )


async def test_a_dead_letter_with_nul_in_its_headers_is_archived_escaped(
    any_store: SqlSagaStore,
) -> None:
    archive = DeadLetterArchive(any_store, failure_backoff=0.01)
    letter = _letter("bad\x00reason", **{DEAD_LETTER_ID: "id\x00", "x-app": "a\x00b"})
    assert await archive.handle(letter) is True
    assert letter.settled == ["ack"]
    (kept,) = await any_store.list_dead_letters()
    assert kept.reason == "bad\\x00reason"
    assert kept.source == "saga.re\\x00plies"
    assert kept.key == "key\\x00"
    assert kept.headers["x-app"] == "a\\x00b"
    assert kept.body == '{"not": "an envelope"}'


class RefusingStore(SqlSagaStore):
    """A store whose add_dead_letter fails with ``error`` while ``refuse`` says so."""

    def __init__(self, inner: SqlSagaStore, error: BaseException, refuse: Any) -> None:
        super().__init__(inner.engine)
        self.error = error
        self.refuse = refuse
        self.calls = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with super().transaction() as tx:
            outer = self

            class Refusing:
                def __getattr__(self, name: str) -> Any:
                    return getattr(tx, name)

                async def add_dead_letter(self, letter: Any) -> int | None:
                    outer.calls += 1
                    if outer.refuse(letter):
                        raise outer.error
                    return await tx.add_dead_letter(letter)

            yield Refusing()


async def test_a_dead_letter_refused_whole_is_archived_minimally(
    any_store: SqlSagaStore,
) -> None:
    refusing = RefusingStore(any_store, _db_error("22001", DataError), lambda r: r.headers)
    archive = DeadLetterArchive(refusing, failure_attempts=3, failure_backoff=0.01)
    letter = _letter("too much")
    assert await archive.handle(letter) is True
    assert letter.settled == ["ack"]
    assert refusing.calls == 3 + 1
    (kept,) = await any_store.list_dead_letters()
    assert kept.body == '{"not": "an envelope"}'
    assert kept.headers == {}
    assert kept.reason.startswith("too much (archived without headers: _FakeOrig: error 22001")


async def test_a_dead_letter_refused_even_minimally_is_acknowledged_not_looped(
    any_store: SqlSagaStore, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = RefusingStore(any_store, ValueError("refused"), lambda r: True)
    archive = DeadLetterArchive(refusing, failure_attempts=2, failure_backoff=0.01)
    letter = _letter("whatever")
    assert await archive.handle(letter) is True
    assert letter.settled == ["ack"]
    assert refusing.calls == 2 + 1
    assert "dead letter dropped" in caplog.text
    assert await any_store.list_dead_letters() == []


async def test_a_dead_letter_the_database_cannot_take_now_is_handed_back(
    any_store: SqlSagaStore,
) -> None:
    refusing = RefusingStore(any_store, ConnectionResetError("gone"), lambda r: True)
    archive = DeadLetterArchive(refusing, failure_attempts=3, failure_backoff=0.01)
    letter = _letter("whatever")
    assert await archive.handle(letter) is False
    assert letter.settled == ["nack"]
    assert refusing.calls == 1


# -- the running engine ------------------------------------------------------------------


async def test_the_running_engine_applies_a_reply_whose_saga_commits_late(
    store: SqlSagaStore,
) -> None:
    broker = MemoryBroker(dead_letters=TOPOLOGY.dead_letters)
    engine = Engine(
        store,
        MemoryTransport(broker),
        SagaRegistry([place_order]),
        settings=EngineSettings(timer_interval=0.02, unknown_saga_patience=PATIENCE),
    )
    await engine.transport.connect()
    running = asyncio.create_task(engine.run())
    sender = MemoryTransport(broker)
    await sender.connect()
    try:
        # Started now (its step timeout in the future): a saga started at the test
        # clock's epoch would time out before its reply's next scan.
        now = Clock()
        now.now = datetime.now(UTC)
        late = pending_saga("late", now)
        await sender.publish([Message(TOPOLOGY.replies, "late", encode(late.reply))])

        async def deferred() -> bool:
            return bool(await deferred_rows(store))

        await _wait(deferred, "the reply to be set aside")
        await late.commit(store)

        async def applied() -> bool:
            return await reserve_status(store, "late") is StepStatus.SUCCEEDED

        await _wait(applied, "the late saga's reply to be applied")
        assert await deferred_rows(store) == {}
        assert engine.deferred_settled == 1
        detail = await store.get_saga("late")
        assert detail is not None and detail.status is SagaStatus.RUNNING
        assert [h.event for h in detail.history].count("step_succeeded") == 1
    finally:
        engine.stop()
        await asyncio.wait_for(running, 10)
        await sender.close()
        await engine.transport.close()


async def _wait(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
