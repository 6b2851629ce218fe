"""End to end: engine + the example workers on SQLite and the in-memory broker."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.advance import Advancer
from engine.clock import utc_now
from engine.database import create_engine
from engine.definition import Saga
from engine.errors import InvalidInputError, SagaError, UnknownSagaError
from engine.messages import Envelope, MessageKind, Outcome, decode, encode
from engine.orchestrator import Engine, ReplyOutcome, ReplyResult
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.states import SagaStatus, StepStatus
from engine.store.schema import barrier, inbox, outbox, timers
from engine.store.sql import SqlSagaStore
from engine.transport.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message, Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.views import SagaDetail
from sagas.order import place_order
from tests.helpers import (
    EXAMPLE_WORKERS,
    ORDER_STEPS,
    PRICE,
    QUANTITY,
    ChaosTransport,
    EmbeddedSystem,
    assert_books_balance,
    assert_compensated_in_reverse,
    fast_order_saga,
    flaky_worker,
    history_events,
    order_input,
)
from workers import payment


async def test_mixed_outcomes_end_completed_or_compensated_with_balanced_books(
    system: EmbeddedSystem,
) -> None:
    plan = [None, "reserve_inventory", None, "charge_payment", "create_shipment", None] * 2
    ids = {await system.start_order(fail_at): fail_at for fail_at in plan}
    sagas = await system.wait_all_terminal(20)
    assert set(sagas) == set(ids)
    effect_of = await system.effects()
    for saga_id, fail_at in ids.items():
        detail = sagas[saga_id]
        steps = {s.name: s.status for s in detail.steps}
        if fail_at is None:
            assert detail.status is SagaStatus.COMPLETED, detail.error
            assert set(steps.values()) == {StepStatus.SUCCEEDED}
            assert detail.error is None
        else:
            assert detail.status is SagaStatus.COMPENSATED
            assert steps[fail_at] is StepStatus.FAILED
            failed_at = ORDER_STEPS.index(fail_at)
            assert history_events(detail, "step_compensated") == list(
                reversed(ORDER_STEPS[:failed_at])
            )
            assert detail.error is not None and detail.error.startswith(f"step {fail_at!r} failed")
        assert_compensated_in_reverse(detail)
        assert_books_balance(detail, effect_of)

    completed = sum(1 for f in plan if f is None)
    totals = await system.totals()
    assert totals.stock_conserved and totals.money_conserved
    assert totals.stock_reserved == QUANTITY * completed
    assert totals.charged_cents - totals.refunded_cents == PRICE * completed
    assert totals.refunded_cents == PRICE * plan.count("create_shipment")
    assert totals.shipments_created == completed
    assert system.broker.depth(system.topology.dead_letters) == 0
    assert await system.dead_letters() == []


async def test_failure_reasons_reach_the_saga(system: EmbeddedSystem) -> None:
    saga_id = await system.start_order("charge_payment")
    detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
    charge_step = next(s for s in detail.steps if s.name == "charge_payment")
    assert charge_step.error == (f"insufficient funds: poor has 0 cents, order costs {PRICE}")
    assert detail.error == f"step 'charge_payment' failed: {charge_step.error}"
    reserve = next(s for s in detail.steps if s.name == "reserve_inventory")
    assert reserve.reply == {"sku": "A", "quantity": QUANTITY, "left": 1000 - QUANTITY}
    assert reserve.compensation_attempts == 1


# -- bad input -------------------------------------------------------------------------


async def test_invalid_input_and_unknown_saga_are_refused_before_anything_is_stored(
    system: EmbeddedSystem,
) -> None:
    with pytest.raises(InvalidInputError, match="quantity: Input should be greater than 0"):
        await system.client.start("place_order", {**_order(), "quantity": 0})
    with pytest.raises(UnknownSagaError, match=r"unknown saga 'nope' \(known: place_order v1\)"):
        await system.client.start("nope", _order())
    saga_id = await system.client.start("place_order", _order(), saga_id="fixed-id")
    with pytest.raises(SagaError, match="a saga with id 'fixed-id' already exists"):
        await system.client.start("place_order", _order(), saga_id="fixed-id")
    assert [s.id for s in await system.client.list()] == [saga_id]


def _order() -> dict[str, object]:
    return order_input()


async def _publish_reply_bodies(broker: MemoryBroker, bodies: list[bytes]) -> None:
    sender = MemoryTransport(broker)
    await sender.connect()
    await sender.publish([Message("saga.replies", "k", body) for body in bodies])
    await sender.close()


async def test_undecodable_reply_is_dead_lettered_and_the_engine_keeps_going(
    system: EmbeddedSystem,
) -> None:
    not_a_reply = Envelope(
        saga_id="x",
        saga_name="place_order",
        saga_version=1,
        step="s",
        kind=MessageKind.COMMAND,
        name="s",
        attempt=1,
    )
    await _publish_reply_bodies(system.broker, [b"\x00garbage", encode(not_a_reply)])
    saga_id = await system.start_order()
    detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
    assert detail.status is SagaStatus.COMPLETED

    dead = await system.dead_letters(2)
    assert [m.body for m in dead] == ["\x00garbage", encode(not_a_reply).decode()]
    assert all(m.source == "saga.replies" for m in dead)
    assert all(m.headers[DEAD_LETTER_SOURCE] == "saga.replies" for m in dead)
    assert dead[0].reason.startswith("not a saga envelope")
    assert dead[0].headers[DEAD_LETTER_REASON] == dead[0].reason
    assert dead[1].reason == "the engine takes replies, not a command"


async def test_reply_for_an_unknown_saga_is_dead_lettered_after_patience(
    system: EmbeddedSystem,
) -> None:
    orphan = Envelope(
        saga_id="ghost",
        saga_name="place_order",
        saga_version=1,
        step="reserve_inventory",
        kind=MessageKind.COMMAND,
        name="reserve_inventory",
        attempt=1,
    ).reply(Outcome.SUCCESS)
    await _publish_reply_bodies(system.broker, [encode(orphan)])
    dead = await system.dead_letters(1)
    assert dead[0].reason == "no saga ghost after 0.5s"
    assert dead[0].saga_id == "ghost"
    saga_id = await system.start_order()
    assert (await system.wait_all_terminal(10, [saga_id]))[saga_id].status is SagaStatus.COMPLETED


# -- duplicates ------------------------------------------------------------------------


async def test_reply_delivered_twice_advances_once(tmp_path: Path) -> None:
    def duplicating(broker: MemoryBroker, role: str) -> Transport:
        inner = MemoryTransport(broker)
        if role == "engine":
            return inner
        return ChaosTransport(inner, random.Random(0), duplicate=1.0)

    async with EmbeddedSystem(tmp_path / "dup.db", transport_factory=duplicating) as system:
        saga_id = await system.start_order()
        detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert detail.status is SagaStatus.COMPLETED
        assert [(h.event, h.step) for h in detail.history] == [
            ("started", None),
            ("step_succeeded", "reserve_inventory"),
            ("step_succeeded", "charge_payment"),
            ("step_succeeded", "create_shipment"),
            ("completed", None),
        ]
        assert all(s.attempts == 1 for s in detail.steps)
        engine = system.engine
        assert engine is not None

        async def replies_consumed() -> bool:
            return engine.replies_handled >= 6  # three replies, each delivered twice

        await system.wait_for(replies_consumed, 5, "the duplicate replies to be consumed")
        assert engine.replies_handled == 6
        assert system.broker.depth("saga.replies") == 0
        async with system.db.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(inbox)) == 3
        effect = (await system.effects())[saga_id]
        assert (effect.charges, effect.reserved, effect.shipped) == (1, QUANTITY, True)


async def test_handle_reply_applies_a_message_id_once(system: EmbeddedSystem) -> None:
    await system.stop_worker("inventory")
    saga_id = await system.start_order()

    async def dispatched() -> bool:
        return system.broker.depth("saga.commands.inventory") == 1

    await system.wait_for(dispatched, 5, "the first command")
    (command,) = system.command_envelopes("inventory")
    reply = command.reply(Outcome.FAILURE, error="closed for inventory")
    assert system.engine is not None
    assert await system.engine.handle_reply(reply) is True
    before = await system.client.get(saga_id)
    assert await system.engine.handle_reply(reply) is False
    after = await system.client.get(saga_id)
    assert after == before
    assert after.status is SagaStatus.COMPENSATED
    assert history_events(after, "reply_ignored") == []


async def test_a_batch_of_replies_applies_each_in_order_in_one_transaction(
    system: EmbeddedSystem,
) -> None:
    await system.stop_worker("inventory")
    ids = [await system.start_order() for _ in range(3)]

    async def dispatched() -> bool:
        return system.broker.depth("saga.commands.inventory") == 3

    await system.wait_for(dispatched, 5, "three commands")
    commands = {c.saga_id: c for c in system.command_envelopes("inventory")}
    a, b, c = (commands[saga_id] for saga_id in ids)
    ok_a = a.reply(Outcome.SUCCESS, payload={"reservation": "r-a"})
    late_a = a.reply(Outcome.FAILURE, error="too late: the saga moved on")
    stranger = c.reply(Outcome.SUCCESS).model_copy(update={"saga_id": "no-such-saga"})
    batch = [
        ok_a,
        b.reply(Outcome.FAILURE, error="out of stock"),
        ok_a,  # the same message twice in one batch
        late_a,
        c.reply(Outcome.SUCCESS, payload={"reservation": "r-c"}),
        stranger,
    ]
    assert system.engine is not None
    outcomes = [result.outcome for result in await system.engine.apply_replies(batch)]
    assert outcomes == [
        ReplyOutcome.APPLIED,
        ReplyOutcome.APPLIED,
        ReplyOutcome.DUPLICATE,
        ReplyOutcome.APPLIED,  # applied after ok_a, so it no longer matches: ignored
        ReplyOutcome.APPLIED,
        ReplyOutcome.NOT_VISIBLE,
    ]
    assert await system.engine.apply_replies([ok_a]) == [ReplyResult(ReplyOutcome.DUPLICATE)]
    final = await system.wait_all_terminal(10, ids)
    assert [final[s].status for s in ids] == [
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATED,
        SagaStatus.COMPLETED,
    ]
    assert history_events(final[ids[0]], "reply_ignored") == ["reserve_inventory"]
    assert history_events(final[ids[0]], "step_succeeded").count("reserve_inventory") == 1
    async with system.db.connect() as conn:
        claimed = await conn.scalar(
            select(func.count())
            .select_from(inbox)
            .where(inbox.c.message_id.in_([m.message_id for m in batch]))
        )
    assert claimed == 4  # each applied message id once; the stranger's was not claimed


# -- timeouts --------------------------------------------------------------------------


def _with_shipment_timeout(seconds: float) -> Saga:
    base = fast_order_saga()
    steps = [
        replace(s, timeout=timedelta(seconds=seconds)) if s.name == "create_shipment" else s
        for s in base.steps
    ]
    return Saga(name=base.name, version=base.version, input=base.input, steps=steps)


@pytest.mark.parametrize("compensation_first", [True, False])
async def test_step_whose_worker_is_not_running_times_out_and_is_compensated(
    tmp_path: Path, compensation_first: bool
) -> None:
    async with EmbeddedSystem(
        tmp_path / "timeout.db",
        sagas=[_with_shipment_timeout(0.3)],
        run_workers=["inventory", "payment"],
    ) as system:
        saga_id = await system.start_order()
        await system.wait_status(
            saga_id,
            lambda d: "create_shipment" in history_events(d, "step_timed_out"),
            10,
            "the shipment step to time out",
        )
        await system.wait_for(
            _queue_has(system.broker, "saga.commands.shipment", 2), 5, "its compensation"
        )
        waiting = system.command_envelopes("shipment")
        assert waiting[0].kind is MessageKind.COMMAND and waiting[0].attempt == 1
        assert {m.kind for m in waiting[1:]} == {MessageKind.COMPENSATION}
        if compensation_first:
            waiting = waiting[1:] + waiting[:1]  # the action arrives after its compensation
        sender = MemoryTransport(system.broker)
        await sender.connect()
        await sender.publish(
            [Message("saga.commands.shipment", m.saga_id, encode(m)) for m in waiting]
        )
        await sender.close()
        await system.start_worker("shipment")

        def finished(d: SagaDetail) -> bool:
            ignored = [h for h in d.history if h.event == "reply_ignored"]
            return d.status.is_terminal and any(
                "command attempt 1" in (h.detail or "") for h in ignored
            )

        detail = await system.wait_status(saga_id, finished, 15, "compensation to finish")
        assert detail.status is SagaStatus.COMPENSATED
        events = [(h.event, h.step) for h in detail.history]
        assert events.index(("step_timed_out", "create_shipment")) < events.index(
            ("step_compensated", "create_shipment")
        )
        assert history_events(detail, "step_compensated") == list(reversed(ORDER_STEPS))
        steps = {s.name: s for s in detail.steps}
        assert steps["create_shipment"].status is StepStatus.COMPENSATED
        assert steps["create_shipment"].error is not None

        totals = await system.totals()
        effect = (await system.effects())[saga_id]
        assert (effect.reserved, effect.net_charged_cents, effect.shipped) == (0, 0, False)
        assert effect.charges == effect.refunds == 1
        assert totals.stock_conserved and totals.money_conserved
        async with system.db.connect() as conn:
            rows = (
                await conn.execute(
                    select(barrier.c.op, barrier.c.origin, barrier.c.outcome).where(
                        barrier.c.participant == "shipment"
                    )
                )
            ).all()
        if compensation_first:
            # Null compensation, then the hanging action was refused: no shipment at all.
            assert (totals.shipments_created, totals.shipments_cancelled) == (0, 0)
            assert sorted(tuple(r) for r in rows) == [
                ("action", "compensation", "skipped"),
                ("compensation", "compensation", "success"),
            ]
        else:
            # The late action ran, and its compensation undid it.
            assert (totals.shipments_created, totals.shipments_cancelled) == (0, 1)
            assert sorted(tuple(r) for r in rows) == [
                ("action", "command", "success"),
                ("compensation", "compensation", "success"),
            ]


async def test_timer_due_while_the_engine_is_down_fires_after_restart(tmp_path: Path) -> None:
    async with EmbeddedSystem(
        tmp_path / "down.db",
        sagas=[_with_shipment_timeout(0.2)],
        run_workers=["inventory", "payment"],
    ) as system:
        saga_id = await system.start_order()
        await system.wait_for(
            _queue_has(system.broker, "saga.commands.shipment", 1), 10, "the shipment command"
        )
        await system.stop_engine()
        async with system.db.connect() as conn:
            (due_at,) = (await conn.execute(select(timers.c.due_at))).scalars().all()

        async def overdue() -> bool:
            return utc_now() > due_at

        await system.wait_for(overdue, 5, "the step deadline to pass")
        assert (await system.client.get(saga_id)).status is SagaStatus.RUNNING
        await system.start_engine()
        await system.wait_status(
            saga_id,
            lambda d: "create_shipment" in history_events(d, "step_timed_out"),
            10,
            "the overdue timer to fire",
        )
        await system.start_worker("shipment")
        final = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPENSATED
        assert history_events(final, "step_compensated") == list(reversed(ORDER_STEPS))
        assert_compensated_in_reverse(final)
        assert_books_balance(final, await system.effects())


def _queue_has(broker: MemoryBroker, destination: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return broker.depth(destination) >= count

    return check


# -- retries ---------------------------------------------------------------------------


async def test_transient_errors_are_retried_until_the_step_succeeds(tmp_path: Path) -> None:
    workers = dict(EXAMPLE_WORKERS)
    workers["payment"] = flaky_worker(payment.worker, random.Random(3), error_rate=0.5)
    async with EmbeddedSystem(
        tmp_path / "flaky.db", sagas=[fast_order_saga()], workers=workers
    ) as system:
        ids = [await system.start_order() for _ in range(6)]
        sagas = await system.wait_all_terminal(20, ids)
        effect_of = await system.effects()
        retried = 0
        for detail in sagas.values():
            assert_compensated_in_reverse(detail)
            assert_books_balance(detail, effect_of)
            retried += len(history_events(detail, "step_error"))
        assert retried > 0
        totals = await system.totals()
        assert totals.money_conserved and totals.stock_conserved


async def test_late_duplicate_of_a_command_whose_retries_ran_out_is_refused(
    tmp_path: Path,
) -> None:
    """Retries exhausted does not mean the step never ran: an earlier attempt may still
    be delivered (a redelivery, a second publish). The engine compensates the step, so
    the barrier refuses that late attempt instead of charging a compensated order."""
    workers = dict(EXAMPLE_WORKERS)
    workers["payment"] = flaky_worker(payment.worker, random.Random(0), error_rate=1.0)
    async with EmbeddedSystem(
        tmp_path / "exhausted.db", sagas=[fast_order_saga()], workers=workers
    ) as system:
        saga_id = await system.start_order()
        detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert detail.status is SagaStatus.COMPENSATED
        charge_step = next(s for s in detail.steps if s.name == "charge_payment")
        assert charge_step.attempts == 4
        assert history_events(detail, "step_compensated") == [
            "charge_payment",
            "reserve_inventory",
        ]

        # Attempt 1 of the charge, as the relay published it, arrives once more.
        async with system.db.connect() as conn:
            bodies = (await conn.execute(select(outbox.c.body).order_by(outbox.c.id))).scalars()
            first_charge = next(
                decode(b.encode()) for b in bodies if decode(b.encode()).name == "charge_payment"
            )
        assert first_charge.attempt == 1
        await system.stop_worker("payment")
        system.workers["payment"] = payment.worker  # the participant recovered
        runner = await system.start_worker("payment")
        sender = MemoryTransport(system.broker)
        await sender.connect()
        await sender.publish([Message("saga.commands.payment", saga_id, encode(first_charge))])
        await sender.close()

        async def handled() -> bool:
            return runner.handled == 1

        await system.wait_for(handled, 5, "the late duplicate to be handled")
        final = await system.wait_status(
            saga_id,
            lambda d: bool(history_events(d, "reply_ignored")),
            5,
            "the refusal to reach the engine",
        )
        assert final.status is SagaStatus.COMPENSATED
        effect = (await system.effects()).get(saga_id)
        assert effect is None or (effect.charges, effect.net_charged_cents) == (0, 0)
        assert (await system.totals()).charged_cents == 0


# -- relay and restarts ----------------------------------------------------------------


async def test_outbox_rows_stay_pending_while_the_broker_refuses(tmp_path: Path) -> None:
    chaos: list[ChaosTransport] = []

    def refusing(broker: MemoryBroker, role: str) -> Transport:
        inner = MemoryTransport(broker)
        if role != "engine":
            return inner
        transport = ChaosTransport(inner, random.Random(0), refuse=1.0)
        chaos.append(transport)
        return transport

    async with EmbeddedSystem(tmp_path / "refuse.db", transport_factory=refusing) as system:
        saga_id = await system.start_order()

        async def refused_twice() -> bool:
            return chaos[0].refused >= 2

        await system.wait_for(refused_twice, 5, "the relay to try twice")
        async with system.db.connect() as conn:
            pending = await conn.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            )
        assert pending == 1
        assert system.broker.depth("saga.commands.inventory") == 0
        chaos[0].refuse = 0.0
        detail = (await system.wait_all_terminal(15, [saga_id]))[saga_id]
        assert detail.status is SagaStatus.COMPLETED
        async with system.db.connect() as conn:
            sent = (await conn.execute(select(outbox.c.sent_at))).scalars().all()
        assert len(sent) == 3 and all(at is not None for at in sent)


@pytest.mark.parametrize("crash", [False, True])
async def test_a_new_engine_finishes_what_the_old_one_started(tmp_path: Path, crash: bool) -> None:
    async with EmbeddedSystem(tmp_path / "restart.db") as system:
        ids = [
            await system.start_order(f) for f in (None, "create_shipment", None, "charge_payment")
        ]
        await system.stop_engine(crash=crash)
        ids += [await system.start_order() for _ in range(2)]  # started while it is down
        assert {s.status for s in await system.client.list()} >= {SagaStatus.RUNNING}
        await system.start_engine()
        sagas = await system.wait_all_terminal(20, ids)
        statuses = Counter(d.status for d in sagas.values())
        assert statuses == Counter({SagaStatus.COMPLETED: 4, SagaStatus.COMPENSATED: 2})
        effect_of = await system.effects()
        for detail in sagas.values():
            assert_compensated_in_reverse(detail)
            assert_books_balance(detail, effect_of)


async def test_a_timer_of_a_saga_this_engine_cannot_load_does_not_block_the_others(
    tmp_path: Path,
) -> None:
    """Another replica (or an older deployment) may run sagas this engine has no
    definition for; their due timers must not stall every other saga's timers. With no
    running engine that serves them, they are held (visibly, their timers paused)."""
    legacy = Saga(
        name="legacy",
        version=1,
        input=place_order.input,
        steps=[
            replace(place_order.steps[0], participant="nobody", timeout=timedelta(seconds=0.01))
        ],
    )
    async with EmbeddedSystem(
        tmp_path / "foreign.db",
        sagas=[_with_shipment_timeout(0.2)],
        run_workers=["inventory", "payment"],
    ) as system:
        # Started by an older deployment's client (today's refuses a version no
        # running engine serves): the one write path, under that definition.
        foreign = Advancer(SagaRegistry([legacy]))
        data = legacy.parse_input(order_input()).model_dump(mode="json")
        legacy_ids = [str(uuid.uuid4()) for _ in range(3)]
        for legacy_id in legacy_ids:
            await foreign.start(system.store, legacy, legacy_id, data)
        saga_id = await system.start_order()
        await system.wait_status(
            saga_id,
            lambda d: "create_shipment" in history_events(d, "step_timed_out"),
            10,
            "the order's own step timeout to fire",
        )
        for legacy_id in legacy_ids:
            held = await system.wait_status(
                legacy_id, lambda d: d.held is not None, 10, "the legacy saga to be held"
            )
            assert held.status is SagaStatus.RUNNING
            assert held.held == (
                "no running engine loads legacy v1 (this one loads no version of it)"
            )
            assert [h.event for h in held.history] == ["started", "held"]
            assert held.steps[0].status is StepStatus.DISPATCHED  # its timeout paused


async def test_two_engine_replicas_share_the_work_without_double_advancing(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(tmp_path / "replicas.db") as system:
        second_db = create_engine(f"sqlite:///{system.db_path}")
        transport = MemoryTransport(system.broker)
        await transport.connect()
        second_store = SqlSagaStore(second_db)
        replica = Engine(
            second_store,
            transport,
            system.registry,
            settings=system.settings,
            relay=OutboxRelay(second_store, transport, poll_interval=0.01),
            rng=random.Random(5),
            instance_id="replica-2",
        )
        task = asyncio.create_task(replica.run())
        try:
            plan = [None, "charge_payment", None, "create_shipment", "reserve_inventory", None] * 2
            ids = [await system.start_order(f) for f in plan]
            sagas = await system.wait_all_terminal(20, ids)
            effect_of = await system.effects()
            for detail in sagas.values():
                assert_compensated_in_reverse(detail)
                assert_books_balance(detail, effect_of)
            assert Counter(d.status for d in sagas.values()) == Counter(
                {SagaStatus.COMPLETED: 6, SagaStatus.COMPENSATED: 6}
            )
            assert system.engine is not None
            first = system.engine

            async with system.db.connect() as conn:
                messages = await conn.scalar(select(func.count()).select_from(outbox))
                claimed = await conn.scalar(select(func.count()).select_from(inbox))

            async def all_replies_handled() -> bool:
                return first.replies_handled + replica.replies_handled == messages

            await system.wait_for(all_replies_handled, 5, "every reply to be handled")
            # Every command got exactly one reply, applied by exactly one replica.
            assert claimed == messages
            assert first.relay.published + replica.relay.published == messages
        finally:
            replica.stop()
            await asyncio.wait_for(task, 10)
            await transport.close()
            await second_db.dispose()
