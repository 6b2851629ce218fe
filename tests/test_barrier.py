"""The participant barrier, through the real worker runtime on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

import engine.worker.barrier as barrier_module
import engine.worker.runner as runner_module
from engine.clock import utc_now
from engine.database import create_engine, upgrade
from engine.errors import BusinessFailure
from engine.messages import Envelope, MessageKind, Outcome, encode
from engine.store.schema import barrier
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.worker.barrier import REFUSED, SqlBarrier
from engine.worker.barrier import prune as barrier_prune
from engine.worker.runner import WorkerRunner
from engine.worker.worker import HandlerContext, Registration, Worker
from sagas.order import ChargePayment
from tests.e2e import fresh_database
from tests.helpers import FakeDelivery, charge_command, envelopes, wait_until
from tests.services import service_url
from workers import inventory, ledger, payment

TOPOLOGY = Topology()


def counting(worker: Worker) -> tuple[Worker, Counter[str]]:
    """A copy of ``worker`` that counts how often each handler body really runs."""
    calls: Counter[str] = Counter()
    copy = Worker(worker.name)
    for key, reg in worker.handlers.items():

        def wrap(reg: Registration) -> Registration:
            async def handler(command: Any, context: HandlerContext) -> Any:
                calls[reg.name] += 1
                return await reg.handler(command, context)

            return Registration(reg.name, reg.kind, reg.model, handler)

        copy.handlers[key] = wrap(reg)
    return copy, calls


class Participant:
    def __init__(self, worker: Worker, db: AsyncEngine, broker: MemoryBroker) -> None:
        self.db = db
        self.broker = broker
        self.transport = MemoryTransport(broker)
        self.runner = WorkerRunner(worker, self.transport, SqlBarrier(db), topology=TOPOLOGY)

    async def deliver(self, envelope: Envelope) -> tuple[list[str], list[Envelope]]:
        """Hand one delivery to the runner; return how it settled and the replies sent."""
        delivery = FakeDelivery(
            Message(TOPOLOGY.commands(self.runner.worker.name), envelope.saga_id, encode(envelope))
        )
        await self.runner.handle_delivery(delivery)
        return delivery.settled, envelopes(self.broker.drain(TOPOLOGY.replies))

    async def one_reply(self, envelope: Envelope) -> Envelope:
        settled, replies = await self.deliver(envelope)
        assert settled == ["ack"]
        assert len(replies) == 1
        return replies[0]

    async def barrier_rows(self) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await conn.execute(select(barrier).order_by(barrier.c.saga_id, barrier.c.op))
            return [dict(r._mapping) for r in rows]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The participant's database, migrated: SQLite (one write lock for everything, so
    the runner keeps handlers' waiting out of transactions), then PostgreSQL (row locks,
    one transaction per batch)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'saga.db'}"
        engine = create_engine(url)
        await upgrade(engine, scripts=[ledger.MIGRATIONS])
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        engine = create_engine(url)
        try:
            yield engine
        finally:
            await engine.dispose()


@pytest.fixture
async def seeded(db: AsyncEngine) -> AsyncEngine:
    await ledger.seed(db, stock_by_sku={"A": 10}, balances={"alice": 5000, "poor": 100})
    return db


@pytest.fixture
async def broker() -> MemoryBroker:
    return MemoryBroker()


async def participant(worker: Worker, db: AsyncEngine, broker: MemoryBroker) -> Participant:
    p = Participant(worker, db, broker)
    await p.transport.connect()
    return p


@pytest.fixture
async def pay(seeded: AsyncEngine, broker: MemoryBroker) -> AsyncIterator[Participant]:
    p = await participant(payment.worker, seeded, broker)
    yield p
    await p.transport.close()


TRACE = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}


def charge(
    saga_id: str = "o1", attempt: int = 1, customer: str = "alice", amount: int = 700
) -> Envelope:
    return charge_command(saga_id, attempt, customer, amount, headers=TRACE)


def refund(saga_id: str = "o1", attempt: int = 1) -> Envelope:
    return Envelope(
        saga_id=saga_id,
        saga_name="place_order",
        saga_version=1,
        step="charge_payment",
        kind=MessageKind.COMPENSATION,
        name="refund_payment",
        attempt=attempt,
        payload={"order_id": saga_id},
    )


async def balance(db: AsyncEngine, customer: str = "alice") -> int:
    async with db.connect() as conn:
        value = await conn.scalar(
            select(payment.accounts.c.balance_cents).where(
                payment.accounts.c.customer_id == customer
            )
        )
    assert value is not None
    return int(value)


async def ledger_rows(db: AsyncEngine) -> list[tuple[str, str, int]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(
                payment.ledger.c.order_id, payment.ledger.c.kind, payment.ledger.c.amount_cents
            ).order_by(payment.ledger.c.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


# -- duplicates ------------------------------------------------------------------------


async def test_duplicate_command_runs_the_effect_once_and_replies_the_same(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, calls = counting(payment.worker)
    p = await participant(worker, seeded, broker)
    first = await p.one_reply(charge())
    second = await p.one_reply(charge())
    assert first.outcome is Outcome.SUCCESS
    assert (second.outcome, second.payload, second.error) == (
        first.outcome,
        first.payload,
        first.error,
    )
    assert first.payload["amount_cents"] == 700
    assert calls["charge_payment"] == 1
    assert await ledger_rows(seeded) == [("o1", "charge", 700)]
    assert await balance(seeded) == 5000 - 700
    (row,) = await p.barrier_rows()
    assert (row["participant"], row["saga_id"], row["step"], row["op"]) == (
        "payment",
        "o1",
        "charge_payment",
        "action",
    )
    assert (row["origin"], row["outcome"], row["reply"]) == ("command", "success", first.payload)


async def test_redelivered_command_with_a_new_attempt_gets_the_stored_outcome_for_that_attempt(
    pay: Participant,
) -> None:
    await pay.one_reply(charge(attempt=1))
    again = await pay.one_reply(charge(attempt=2))
    assert (again.outcome, again.attempt) == (Outcome.SUCCESS, 2)
    assert await ledger_rows(pay.db) == [("o1", "charge", 700)]


async def test_reply_carries_the_command_token_and_trace_headers(pay: Participant) -> None:
    command = charge(attempt=3)
    reply = await pay.one_reply(command)
    assert (reply.kind, reply.in_reply_to, reply.step, reply.attempt) == (
        MessageKind.REPLY,
        MessageKind.COMMAND,
        "charge_payment",
        3,
    )
    assert reply.causation_id == command.message_id
    # The same trace: the reply's parent span is the worker's when a tracer provider is
    # installed (another test may have installed one), else the command's own.
    trace = command.headers["traceparent"].split("-")[1]
    assert reply.headers["traceparent"].split("-")[1] == trace


async def test_duplicate_compensation_undoes_once(pay: Participant) -> None:
    await pay.one_reply(charge())
    first = await pay.one_reply(refund())
    second = await pay.one_reply(refund(attempt=2))
    assert first.outcome is second.outcome is Outcome.SUCCESS
    assert await ledger_rows(pay.db) == [("o1", "charge", 700), ("o1", "refund", 700)]
    assert await balance(pay.db) == 5000
    assert [(r["op"], r["origin"], r["outcome"]) for r in await pay.barrier_rows()] == [
        ("action", "command", "success"),
        ("compensation", "compensation", "success"),
    ]


# -- null compensation and hanging action -----------------------------------------------


async def test_compensation_before_its_action_succeeds_without_effect_and_blocks_it(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, calls = counting(payment.worker)
    p = await participant(worker, seeded, broker)
    undo = await p.one_reply(refund())
    assert (undo.outcome, undo.in_reply_to) == (Outcome.SUCCESS, MessageKind.COMPENSATION)
    assert calls["refund_payment"] == 0
    rows = await p.barrier_rows()
    assert [(r["op"], r["origin"], r["outcome"]) for r in rows] == [
        ("action", "compensation", "skipped"),
        ("compensation", "compensation", "success"),
    ]

    late = await p.one_reply(charge())
    assert late.outcome is Outcome.FAILURE
    assert late.error == REFUSED
    assert "refused" in late.error
    assert calls["charge_payment"] == 0
    assert await ledger_rows(seeded) == []
    assert await balance(seeded) == 5000
    # Refused again on every redelivery; the null compensation stays a success.
    assert (await p.one_reply(charge(attempt=2))).error == REFUSED
    assert (await p.one_reply(refund(attempt=2))).outcome is Outcome.SUCCESS


# -- business failures -----------------------------------------------------------------


async def test_business_failure_rolls_back_the_handlers_writes_but_records_the_outcome(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker = Worker("inventory")
    calls: Counter[str] = Counter()

    @worker.command("reserve_inventory")
    async def reserve(cmd: dict[str, Any], ctx: HandlerContext) -> None:
        calls["reserve"] += 1
        await ctx.session.execute(
            inventory.stock.insert().values(sku="WRITTEN", available=1, received=1)
        )
        await ctx.session.execute(
            inventory.stock.update().where(inventory.stock.c.sku == "A").values(available=0)
        )
        raise BusinessFailure("nothing left after all")

    p = await participant(worker, seeded, broker)
    envelope = Envelope(
        saga_id="o2",
        saga_name="place_order",
        saga_version=1,
        step="reserve_inventory",
        kind=MessageKind.COMMAND,
        name="reserve_inventory",
        attempt=1,
        payload={"order_id": "o2", "sku": "A", "quantity": 1},
    )
    reply = await p.one_reply(envelope)
    assert (reply.outcome, reply.error) == (Outcome.FAILURE, "nothing left after all")
    async with seeded.connect() as conn:
        skus = dict(
            (await conn.execute(select(inventory.stock.c.sku, inventory.stock.c.available))).all()
        )
    assert skus == {"A": 10}
    (row,) = await p.barrier_rows()
    assert (row["op"], row["outcome"], row["error"]) == (
        "action",
        "failure",
        "nothing left after all",
    )
    again = await p.one_reply(envelope.model_copy(update={"attempt": 2}))
    assert (again.outcome, again.error) == (Outcome.FAILURE, "nothing left after all")
    assert calls["reserve"] == 1


async def test_real_business_failure_leaves_the_books_alone(pay: Participant) -> None:
    reply = await pay.one_reply(charge(customer="poor", amount=500))
    assert reply.outcome is Outcome.FAILURE
    assert reply.error is not None and reply.error.startswith("insufficient funds: poor has 100")
    assert await ledger_rows(pay.db) == []
    assert await balance(pay.db, "poor") == 100


async def test_compensation_of_a_failed_action_is_a_no_op_success(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, calls = counting(payment.worker)
    p = await participant(worker, seeded, broker)
    assert (await p.one_reply(charge(customer="poor", amount=500))).outcome is Outcome.FAILURE
    undo = await p.one_reply(refund())
    assert undo.outcome is Outcome.SUCCESS
    assert calls == Counter({"charge_payment": 1})
    assert await ledger_rows(seeded) == []
    assert [(r["op"], r["outcome"]) for r in await p.barrier_rows()] == [
        ("action", "failure"),
        ("compensation", "success"),
    ]


async def test_invalid_payload_is_a_recorded_business_failure(pay: Participant) -> None:
    bad = charge().model_copy(update={"payload": {"order_id": "o1"}})
    reply = await pay.one_reply(bad)
    assert reply.outcome is Outcome.FAILURE
    assert reply.error is not None and reply.error.startswith("invalid charge_payment payload:")
    assert [(r["op"], r["outcome"]) for r in await pay.barrier_rows()] == [("action", "failure")]


async def test_compensation_that_fails_is_not_recorded_and_runs_again(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker = Worker("payment")
    attempts: list[int] = []
    worker.handlers.update(
        {k: v for k, v in payment.worker.handlers.items() if k[0] is MessageKind.COMMAND}
    )

    @worker.compensation("refund_payment")
    async def refund_handler(cmd: dict[str, Any], ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise BusinessFailure("bank closed")

    p = await participant(worker, seeded, broker)
    await p.one_reply(charge())
    first = await p.one_reply(refund(attempt=1))
    assert (first.outcome, first.error) == (Outcome.FAILURE, "bank closed")
    second = await p.one_reply(refund(attempt=2))
    assert second.outcome is Outcome.SUCCESS
    assert attempts == [1, 2]
    assert [r["op"] for r in await p.barrier_rows()] == ["action", "compensation"]


# -- transient errors --------------------------------------------------------------------


async def test_plain_exception_leaves_no_barrier_row_and_a_retry_runs_the_effect(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker = Worker("payment")
    failures = [True]

    @worker.command("charge_payment")
    async def flaky(cmd: ChargePayment, ctx: HandlerContext) -> payment.Charged:
        result = await payment.charge(cmd, ctx)  # writes, then...
        if failures:
            failures.pop()
            raise ConnectionError("card network unreachable")
        return result

    p = await participant(worker, seeded, broker)
    settled, replies = await p.deliver(charge(attempt=1))
    assert settled == ["ack"]
    (reply,) = replies
    assert reply.outcome is Outcome.ERROR
    assert reply.error == "ConnectionError: card network unreachable"
    assert await p.barrier_rows() == []
    assert await ledger_rows(seeded) == []
    assert await balance(seeded) == 5000

    retry = await p.one_reply(charge(attempt=2))
    assert (retry.outcome, retry.attempt) == (Outcome.SUCCESS, 2)
    assert await ledger_rows(seeded) == [("o1", "charge", 700)]
    assert await balance(seeded) == 4300
    assert [(r["op"], r["outcome"]) for r in await p.barrier_rows()] == [("action", "success")]


async def test_reply_that_cannot_be_sent_is_nacked_and_resent_without_a_second_effect(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, calls = counting(payment.worker)
    p = await participant(worker, seeded, broker)
    await p.transport.close()  # the broker connection drops after the effect commits
    settled, replies = await p.deliver(charge())
    assert (settled, replies) == (["nack"], [])
    await p.transport.connect()
    reply = await p.one_reply(charge())
    assert reply.outcome is Outcome.SUCCESS
    assert calls["charge_payment"] == 1
    assert await ledger_rows(seeded) == [("o1", "charge", 700)]


# -- a handler held while another copy or its compensation goes through ---------------


def held_once(worker: Worker, name: str) -> tuple[Worker, asyncio.Event, asyncio.Event]:
    """A copy of ``worker`` whose first run of handler ``name`` waits, before its first
    statement, until the returned ``release`` is set; ``entered`` tells it is waiting."""
    entered, release = asyncio.Event(), asyncio.Event()
    copy = Worker(worker.name)
    copy.handlers = dict(worker.handlers)
    reg = next(r for r in worker.handlers.values() if r.name == name)

    async def handler(command: Any, context: HandlerContext) -> Any:
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await reg.handler(command, context)

    copy.handlers[(reg.kind, reg.name)] = Registration(reg.name, reg.kind, reg.model, handler)
    return copy, entered, release


async def test_a_duplicate_that_overtakes_a_held_copy_leaves_one_effect(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, entered, release = held_once(payment.worker, "charge_payment")
    p = await participant(worker, seeded, broker)
    first = asyncio.create_task(p.deliver(charge()))
    await asyncio.wait_for(entered.wait(), 30)
    # The copy goes through while the first one waits: nothing holds it up.
    second = await p.one_reply(charge())
    assert second.outcome is Outcome.SUCCESS
    release.set()
    # The held one loses the barrier row: its writes roll back, it is handed back...
    assert await first == (["nack"], [])
    # ...and redelivered, it re-sends the stored outcome.
    again = await p.one_reply(charge())
    assert (again.outcome, again.payload) == (second.outcome, second.payload)
    assert await ledger_rows(seeded) == [("o1", "charge", 700)]
    assert await balance(seeded) == 4300


async def test_a_compensation_that_overtakes_its_held_action_refuses_it(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, entered, release = held_once(payment.worker, "charge_payment")
    p = await participant(worker, seeded, broker)
    action = asyncio.create_task(p.deliver(charge()))
    await asyncio.wait_for(entered.wait(), 30)
    undone = await p.one_reply(refund())  # a null compensation, while the action waits
    assert undone.outcome is Outcome.SUCCESS
    release.set()
    assert await action == (["nack"], [])
    late = await p.one_reply(charge())
    assert (late.outcome, late.error) == (Outcome.FAILURE, REFUSED)
    assert await ledger_rows(seeded) == []
    assert await balance(seeded) == 5000


async def test_a_transaction_kept_open_long_on_sqlite_is_logged_with_the_advice(
    pay: Participant, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_module, "LONG_HOLD", 0.0)  # every transaction is "long"
    with caplog.at_level(logging.WARNING, logger="saga.worker"):
        await pay.one_reply(charge())
    warnings = [r.getMessage() for r in caplog.records if "write lock" in r.getMessage()]
    if pay.runner.one_writer:
        (line,) = warnings
        assert line.startswith("worker payment: command charge_payment of saga o1 kept ")
        assert line.endswith("before its first statement on ctx.session")
    else:  # row locks only: nobody else waited
        assert warnings == []


# -- messages the worker cannot take --------------------------------------------------------


async def test_undecodable_message_is_dead_lettered(pay: Participant) -> None:
    delivery = FakeDelivery(Message(TOPOLOGY.commands("payment"), "k", b"{oops"))
    await pay.runner.handle_delivery(delivery)
    assert len(delivery.settled) == 1
    assert delivery.settled[0].startswith("dead_letter: not a saga envelope")
    assert pay.broker.depth(TOPOLOGY.replies) == 0


async def test_a_reply_sent_to_a_worker_is_dead_lettered(pay: Participant) -> None:
    settled, replies = await pay.deliver(charge().reply(Outcome.SUCCESS))
    assert settled == ["dead_letter: worker 'payment' takes commands, not replies"]
    assert replies == []


async def test_command_without_handler_fails_the_step_and_is_acknowledged(
    pay: Participant,
) -> None:
    unknown = charge().model_copy(update={"name": "teleport"})
    settled, replies = await pay.deliver(unknown)
    reason = "worker 'payment' has no handler for command 'teleport'"
    assert settled == ["ack"]
    (reply,) = replies
    assert (reply.outcome, reply.error) == (Outcome.FAILURE, reason)


async def test_runner_consumes_from_its_destination(pay: Participant) -> None:
    sender = MemoryTransport(pay.broker)
    await sender.connect()
    task = asyncio.create_task(pay.runner.run())
    try:
        commands = [charge(saga_id=f"o{i}", amount=100) for i in range(3)]
        await sender.publish(
            [Message(pay.runner.destination, c.saga_id, encode(c)) for c in commands]
        )

        async def all_replied() -> bool:
            # Replies are published before their commands are settled and counted.
            return pay.broker.depth(TOPOLOGY.replies) == 3 and pay.runner.handled == 3

        await wait_until(all_replied, 5, "three replies, their commands settled")
        replies = envelopes(pay.broker.drain(TOPOLOGY.replies))
        assert sorted(r.saga_id for r in replies) == ["o0", "o1", "o2"]
        assert all(r.outcome is Outcome.SUCCESS for r in replies)
        assert pay.runner.handled == 3
        assert pay.broker.depth(pay.runner.destination) == 0
    finally:
        pay.runner.stop()
        await asyncio.wait_for(task, 5)
        await sender.close()
    assert await balance(pay.db) == 4700


# -- batches: one transaction, one barrier query, one publish -------------------------


async def deliver_batch(
    p: Participant, batch: list[Envelope]
) -> tuple[list[list[str]], list[Envelope]]:
    deliveries = [
        FakeDelivery(Message(TOPOLOGY.commands(p.runner.worker.name), e.saga_id, encode(e)))
        for e in batch
    ]
    await p.runner.handle_deliveries(deliveries)
    return [d.settled for d in deliveries], envelopes(p.broker.drain(TOPOLOGY.replies))


async def test_a_batch_is_handled_in_order_with_the_barrier_of_each(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    worker, calls = counting(payment.worker)
    pay = await participant(worker, seeded, broker)
    await pay.one_reply(charge("done"))  # handled before: the batch re-sends its outcome
    batch = [
        charge("o1"),
        charge("broke", customer="poor"),  # a business failure: only its writes undone
        charge("done"),
        charge("o2"),
        refund("o2"),  # the compensation of a command earlier in the same batch
        refund("never"),  # a null compensation, and then its hanging action
        charge("never"),
    ]
    settled, replies = await deliver_batch(pay, batch)
    assert settled == [["ack"]] * len(batch)
    assert [(r.saga_id, r.in_reply_to, r.outcome) for r in replies] == [
        ("o1", MessageKind.COMMAND, Outcome.SUCCESS),
        ("broke", MessageKind.COMMAND, Outcome.FAILURE),
        ("done", MessageKind.COMMAND, Outcome.SUCCESS),
        ("o2", MessageKind.COMMAND, Outcome.SUCCESS),
        ("o2", MessageKind.COMPENSATION, Outcome.SUCCESS),
        ("never", MessageKind.COMPENSATION, Outcome.SUCCESS),
        ("never", MessageKind.COMMAND, Outcome.FAILURE),
    ]
    assert replies[-1].error == REFUSED
    assert calls == Counter({"charge_payment": 4, "refund_payment": 1})  # "done" ran once
    assert await ledger_rows(seeded) == [
        ("done", "charge", 700),
        ("o1", "charge", 700),
        ("o2", "charge", 700),
        ("o2", "refund", 700),
    ]
    # And again, as a redelivery of the whole batch: nothing runs a second time.
    settled, again = await deliver_batch(pay, batch)
    assert settled == [["ack"]] * len(batch)
    assert [(r.saga_id, r.outcome) for r in again] == [(r.saga_id, r.outcome) for r in replies]
    assert calls == Counter({"charge_payment": 4, "refund_payment": 1})
    await pay.transport.close()


def with_flaky_charge(worker: Worker, raising: set[str]) -> Worker:
    """``worker`` whose charge handler raises for the orders in ``raising``, after
    writing a ledger row (which must roll back)."""
    flaky_worker = Worker(worker.name)
    flaky_worker.handlers = dict(worker.handlers)
    reg = worker.registration(MessageKind.COMMAND, "charge_payment")
    assert reg is not None

    async def flaky(command: ChargePayment, context: HandlerContext) -> Any:
        result = await reg.handler(command, context)
        if command.order_id in raising:
            raise RuntimeError("the payment provider is down")
        return result

    flaky_worker.handlers[(MessageKind.COMMAND, "charge_payment")] = Registration(
        reg.name, reg.kind, reg.model, flaky
    )
    return flaky_worker


async def test_a_raising_handler_in_a_batch_runs_no_other_handler_again(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    """Each handler of a batch runs in its own savepoint: the one that raises undoes
    only its writes and replies its error as on its own; the others run once and commit."""
    worker, calls = counting(with_flaky_charge(payment.worker, {"bad"}))
    pay = await participant(worker, seeded, broker)
    batch = [charge("o1"), charge("bad"), charge("o2"), charge("o3")]
    settled, replies = await deliver_batch(pay, batch)
    assert settled == [["ack"]] * 4
    assert [(r.saga_id, r.outcome) for r in replies] == [
        ("o1", Outcome.SUCCESS),
        ("bad", Outcome.ERROR),
        ("o2", Outcome.SUCCESS),
        ("o3", Outcome.SUCCESS),
    ]
    assert replies[1].error == "RuntimeError: the payment provider is down"
    assert calls["charge_payment"] == 4  # one run per command, none again
    assert await ledger_rows(seeded) == [
        ("o1", "charge", 700),
        ("o2", "charge", 700),
        ("o3", "charge", 700),
    ]
    assert await balance(seeded) == 5000 - 3 * 700
    # No outcome recorded for the error: its redelivery runs it again, the rest re-send.
    assert [r["saga_id"] for r in await pay.barrier_rows()] == ["o1", "o2", "o3"]
    # Alone, the same command replies the same error (the one-by-one path).
    (alone,) = (await pay.deliver(charge("bad")))[1]
    assert (alone.outcome, alone.error) == (replies[1].outcome, replies[1].error)
    await pay.transport.close()


async def test_a_batch_whose_transaction_fails_is_handled_one_by_one(
    seeded: AsyncEngine, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one case a handler runs twice for one delivery short of a crash: the batch's
    transaction itself fails (here its barrier rows cannot be written), everything
    rolls back, and each command is handled again in a transaction of its own."""
    worker, calls = counting(payment.worker)
    pay = await participant(worker, seeded, broker)
    flush = barrier_module.BarrierBook.flush
    failed: list[int] = []

    async def fail_once(book: barrier_module.BarrierBook) -> None:
        if len(book._new) > 1 and not failed:
            failed.append(len(book._new))
            raise ConnectionError("connection lost")
        await flush(book)

    monkeypatch.setattr(barrier_module.BarrierBook, "flush", fail_once)
    batch = [charge("o1"), charge("o2")]
    settled, replies = await deliver_batch(pay, batch)
    assert settled == [["ack"]] * 2
    assert [(r.saga_id, r.outcome) for r in replies] == [
        ("o1", Outcome.SUCCESS),
        ("o2", Outcome.SUCCESS),
    ]
    if pay.runner.one_writer:  # SQLite: one transaction per command, never a batch
        assert failed == [] and calls["charge_payment"] == 2
    else:
        assert failed == [2] and calls["charge_payment"] == 4
    assert await ledger_rows(seeded) == [("o1", "charge", 700), ("o2", "charge", 700)]
    await pay.transport.close()


@pytest.fixture
async def postgres() -> AsyncIterator[AsyncEngine]:
    """A seeded participant database on PostgreSQL alone (batches share a transaction)."""
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        engine = create_engine(url)
        await ledger.seed(engine, stock_by_sku={"A": 10}, balances={"alice": 5000, "poor": 100})
        try:
            yield engine
        finally:
            await engine.dispose()


@pytest.mark.integration
async def test_a_lost_connection_in_a_batch_runs_no_further_handler_in_it(
    postgres: AsyncEngine, broker: MemoryBroker
) -> None:
    """A handler whose connection is lost leaves a transaction that cannot commit: the
    handlers after it do not run in it, and the batch is handled again one by one."""
    worker, calls = counting(payment.worker)
    reg = worker.registration(MessageKind.COMMAND, "charge_payment")
    assert reg is not None

    async def cut(command: ChargePayment, context: HandlerContext) -> Any:
        if command.order_id == "cut":
            await context.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return await reg.handler(command, context)

    cutting = Worker("payment")
    cutting.handlers = dict(worker.handlers)
    cutting.handlers[(MessageKind.COMMAND, "charge_payment")] = Registration(
        reg.name, reg.kind, reg.model, cut
    )
    pay = await participant(cutting, postgres, broker)
    settled, replies = await deliver_batch(pay, [charge("o1"), charge("cut"), charge("o2")])
    assert settled == [["ack"]] * 3
    assert [(r.saga_id, r.outcome) for r in replies] == [
        ("o1", Outcome.SUCCESS),
        ("cut", Outcome.ERROR),
        ("o2", Outcome.SUCCESS),
    ]
    # o1 ran in the lost batch and again alone (the documented case); o2 only alone.
    assert calls["charge_payment"] == 3
    assert await ledger_rows(postgres) == [("o1", "charge", 700), ("o2", "charge", 700)]
    await pay.transport.close()


async def test_the_idempotency_key_is_the_attempts(
    seeded: AsyncEngine, broker: MemoryBroker
) -> None:
    """The same on a redelivery of an attempt, different for the next attempt and for
    the compensation's (same attempt number)."""
    keys: list[str] = []
    worker = Worker("payment")
    worker.handlers = dict(payment.worker.handlers)
    for kind, name in [
        (MessageKind.COMMAND, "charge_payment"),
        (MessageKind.COMPENSATION, "refund_payment"),
    ]:
        reg = payment.worker.registration(kind, name)
        assert reg is not None

        def keeping(reg: Registration) -> Registration:
            async def handler(command: Any, context: HandlerContext) -> Any:
                keys.append(context.idempotency_key)
                if reg.kind is MessageKind.COMMAND and context.attempt == 1:
                    raise RuntimeError("timed out")  # nothing recorded: every copy runs
                return await reg.handler(command, context)

            return Registration(reg.name, reg.kind, reg.model, handler)

        worker.handlers[(kind, name)] = keeping(reg)
    pay = await participant(worker, seeded, broker)
    for envelope in [charge(attempt=1), charge(attempt=1), charge(attempt=2), refund(attempt=1)]:
        await pay.deliver(envelope)
    first, redelivered, retried, compensation = keys
    assert first == redelivered
    assert len({first, retried, compensation}) == 3
    assert len(first) == 64 and set(first) <= set("0123456789abcdef")
    await pay.transport.close()


# -- pruning ---------------------------------------------------------------------------


async def age_rows(db: AsyncEngine, age: timedelta, **where: str) -> None:
    """Backdate barrier rows (all, or those matching ``where``) by ``age``."""
    condition = [barrier.c[k] == v for k, v in where.items()]
    async with db.begin() as conn:
        await conn.execute(update(barrier).where(*condition).values(created_at=utc_now() - age))


async def keys(db: AsyncEngine) -> list[tuple[str, str, str]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(barrier.c.participant, barrier.c.saga_id, barrier.c.op).order_by(
                barrier.c.participant, barrier.c.saga_id, barrier.c.op
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_prune_removes_only_old_rows_of_its_participant(pay: Participant) -> None:
    await pay.one_reply(charge("old"))
    await pay.one_reply(refund("old"))
    await pay.one_reply(charge("charged"))
    await pay.one_reply(refund("unrun"))  # null compensation: both rows at once
    await age_rows(pay.db, timedelta(days=40))
    await pay.one_reply(charge("young2"))
    async with pay.db.begin() as conn:  # another participant's old row in the same table
        await conn.execute(
            insert(barrier).values(
                participant="inventory",
                saga_id="old",
                step="reserve_inventory",
                op="action",
                origin="command",
                outcome="success",
                created_at=utc_now() - timedelta(days=40),
            )
        )
    before = utc_now() - timedelta(days=30)
    assert await barrier_prune(pay.db, "payment", before, 2) >= 2
    while await barrier_prune(pay.db, "payment", before, 2):
        pass
    assert await keys(pay.db) == [
        ("inventory", "old", "action"),
        ("payment", "young2", "action"),
    ]


async def test_a_step_whose_compensation_is_young_keeps_its_old_action_row(
    pay: Participant,
) -> None:
    """The action's row is what refuses a hanging action: it goes with the step's
    youngest row, never before it."""
    await pay.one_reply(charge())
    await age_rows(pay.db, timedelta(days=40))
    await pay.one_reply(refund())
    assert await barrier_prune(pay.db, "payment", utc_now() - timedelta(days=30), 100) == 0
    assert [op for _, _, op in await keys(pay.db)] == ["action", "compensation"]
    await age_rows(pay.db, timedelta(days=31), op="compensation")
    assert await barrier_prune(pay.db, "payment", utc_now() - timedelta(days=30), 100) == 2
    assert await keys(pay.db) == []


async def test_an_action_whose_row_is_gone_but_whose_compensation_is_known_is_refused(
    pay: Participant,
) -> None:
    await pay.one_reply(charge())
    await pay.one_reply(refund())
    async with pay.db.begin() as conn:
        await conn.execute(delete(barrier).where(barrier.c.op == "action"))
    late = await pay.one_reply(charge(attempt=2))
    assert (late.outcome, late.error) == (Outcome.FAILURE, REFUSED)
    assert await ledger_rows(pay.db) == [("o1", "charge", 700), ("o1", "refund", 700)]


async def test_past_the_retention_a_duplicate_runs_again_the_documented_limit(
    pay: Participant,
) -> None:
    """Why the barrier retention must outlive every copy of a command: once a step's
    rows are pruned, a duplicate of its command is new to the barrier."""
    await pay.one_reply(charge())
    await age_rows(pay.db, timedelta(days=40))
    assert await barrier_prune(pay.db, "payment", utc_now() - timedelta(days=30), 100) == 1
    await pay.one_reply(charge())
    assert await ledger_rows(pay.db) == [("o1", "charge", 700), ("o1", "charge", 700)]


@pytest.mark.integration
async def test_workers_pruning_at_once_on_postgresql_share_the_rows() -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        databases = [create_engine(url) for _ in range(3)]
        try:
            old = utc_now() - timedelta(days=40)
            async with databases[0].begin() as conn:
                await conn.execute(
                    insert(barrier),
                    [
                        {
                            "participant": "payment",
                            "saga_id": f"s{i}",
                            "step": "charge_payment",
                            "op": op,
                            "origin": "command",
                            "outcome": "success",
                            "created_at": old,
                        }
                        for i in range(50)
                        for op in ("action", "compensation")
                    ],
                )
            before = utc_now() - timedelta(days=30)

            async def prune_all(db: AsyncEngine) -> int:
                total = 0
                while removed := await barrier_prune(db, "payment", before, 7):
                    total += removed
                return total

            counts = await asyncio.gather(*(prune_all(d) for d in databases))
            assert sum(counts) == 100
            assert await keys(databases[0]) == []
        finally:
            for d in databases:
                await d.dispose()
