"""The reply watermark: a step timeout waits for the replies already in the broker.

Unit tests of :class:`ReplyWatermark` on a hand-driven clock, then the rule end to end
on the in-process broker, with the engine's reply consumer held back by a gate: the
broker holds the reply, nobody applies it, and the step's deadline has passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine.clock import utc_now
from engine.definition import Saga
from engine.errors import TransportError
from engine.orchestrator import Engine, EngineSettings
from engine.states import SagaStatus
from engine.store.schema import timers
from engine.transport.base import Delivery, Mark, Message, Subscription, Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.watermark import ReplyWatermark
from tests.helpers import EmbeddedSystem, fast_order_saga, history_events

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- the component ---------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


class _Marks:
    """A subscription's marks, scripted: the broker may be down, the consumer behind."""

    def __init__(self) -> None:
        self.down = False
        self.epoch = 0
        self.caught_up = True
        self.taken: list[Mark] = []

    async def mark(self) -> Mark:
        if self.down:
            raise TransportError("broker unreachable")
        mark = Mark(self.epoch, len(self.taken))
        self.taken.append(mark)
        return mark

    async def settled_past(self, mark: Mark) -> bool:
        return self.caught_up


def _watermark(marks: Any, clock: _Clock, hold: float = 60) -> ReplyWatermark:
    return ReplyWatermark(
        marks,
        clock=clock,
        interval=1,
        settle=timedelta(seconds=5),
        hold=timedelta(seconds=hold),
    )


async def test_the_horizon_moves_only_past_marks_the_consumer_settled() -> None:
    clock, marks = _Clock(), _Marks()
    watermark = _watermark(marks, clock)
    await watermark.sample()  # starting is an interruption: marks count from T0+5s
    assert marks.taken and watermark.horizon is None
    clock.at(4)
    await watermark.sample()
    assert watermark.horizon is None
    # No evidence yet: a timeout is due only once it is the hold bound overdue.
    assert watermark.timeouts_due_by(clock()) == clock() - timedelta(seconds=60)

    clock.at(5)
    marks.caught_up = False
    await watermark.sample()
    clock.at(6)
    await watermark.sample()
    assert watermark.horizon is None
    marks.caught_up = True
    clock.at(7)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=7)
    assert watermark.timeouts_due_by(clock()) == clock()
    # Far behind: the evidence is old, the hold bound lets the oldest timeouts go.
    assert watermark.timeouts_due_by(T0 + timedelta(seconds=100)) == T0 + timedelta(seconds=40)


async def test_an_outage_freezes_the_horizon_until_as_long_again_after_it() -> None:
    clock, marks = _Clock(), _Marks()
    watermark = _watermark(marks, clock)
    await watermark.sample()
    clock.at(5)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=5)

    marks.down = True
    for second in (6, 7, 8):
        clock.at(second)
        await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=5)
    marks.down = False
    for second in (9, 12, 13):  # back at 9: workers may still be republishing replies
        clock.at(second)
        await watermark.sample()
        assert watermark.horizon == T0 + timedelta(seconds=5)
    clock.at(14)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=14)

    # A new epoch (a new channel: the broker took back what was in hand) is one too.
    marks.epoch += 1
    clock.at(15)
    await watermark.sample()
    clock.at(19)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=14)
    clock.at(20)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=20)

    # A long outage: the broker is back at 60 after 40s away (the last mark was at
    # 20), so the workers get as long again to come back and answer.
    marks.down = True
    clock.at(21)
    await watermark.sample()
    marks.down = False
    for second in (60, 80, 99):
        clock.at(second)
        await watermark.sample()
        assert watermark.horizon == T0 + timedelta(seconds=20)
    clock.at(100)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=100)


async def test_the_horizon_follows_a_memory_subscription() -> None:
    clock = _Clock()
    transport = MemoryTransport(MemoryBroker())
    await transport.connect()
    subscription = await transport.subscribe("replies", group="engine")
    watermark = _watermark(subscription, clock)
    await watermark.sample()
    clock.at(5)
    await transport.publish([Message("replies", "saga-1", b"reply")])
    await watermark.sample()
    assert watermark.horizon is None  # the reply waits
    delivery = await anext(aiter(subscription))
    clock.at(6)
    await watermark.sample()
    assert watermark.horizon is None  # in hand, not applied
    await delivery.ack()
    clock.at(7)
    await watermark.sample()
    assert watermark.horizon == T0 + timedelta(seconds=7)
    await transport.close()


# -- the rule, in the engine -------------------------------------------------------------


class _GatedSubscription:
    """The engine's reply consumer, held back while the gate is closed: the broker keeps
    the replies, as it does for an engine that is not running yet or far behind."""

    def __init__(self, inner: Subscription, gate: asyncio.Event) -> None:
        self.inner = inner
        self.gate = gate

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        deliveries = aiter(self.inner)
        while True:
            await self.gate.wait()
            yield await anext(deliveries)

    async def close(self) -> None:
        await self.inner.close()

    async def mark(self) -> Mark:
        return await self.inner.mark()

    async def settled_past(self, mark: Mark) -> bool:
        return await self.inner.settled_past(mark)


class _GatedTransport(MemoryTransport):
    def __init__(self, broker: MemoryBroker, gate: asyncio.Event, replies: str) -> None:
        super().__init__(broker)
        self.gate = gate
        self.replies = replies

    async def subscribe(self, destination: str, *, group: str) -> Any:
        inner = await super().subscribe(destination, group=group)
        return _GatedSubscription(inner, self.gate) if destination == self.replies else inner


def _gated(gate: asyncio.Event) -> Callable[[MemoryBroker, str], Transport]:
    def factory(broker: MemoryBroker, role: str) -> Transport:
        if role == "engine":
            return _GatedTransport(broker, gate, "saga.replies")
        return MemoryTransport(broker)

    return factory


SHIPMENT_TIMEOUT = 0.5


def _saga() -> Saga:
    base = fast_order_saga()
    steps = [
        replace(s, timeout=timedelta(seconds=SHIPMENT_TIMEOUT))
        if s.name == "create_shipment"
        else s
        for s in base.steps
    ]
    return Saga(name=base.name, version=base.version, input=base.input, steps=steps)


def _settings(hold: float) -> EngineSettings:
    return EngineSettings(
        timer_interval=0.02,
        unknown_saga_patience=0.5,
        timeout_hold=timedelta(seconds=hold),
        reply_settle=timedelta(seconds=0.1),
        watermark_interval=0.02,
    )


def _count_scans(engine: Engine) -> list[int]:
    """How many timer scans the engine made (its loop calls the instance attribute)."""
    scans = [0]
    fire = engine.fire_due_timers

    async def counting() -> int:
        scans[0] += 1
        return await fire()

    engine.fire_due_timers = counting  # type: ignore[method-assign]
    return scans


async def _reply_waits_past_its_deadline(system: EmbeddedSystem, gate: asyncio.Event) -> str:
    """An order whose shipment reply sits in the broker after the step's deadline, with
    the engine stopped; returns its id. The gate is closed for the next engine."""
    saga_id = await system.start_order()
    commands = system.topology.commands("shipment")

    async def dispatched() -> bool:
        return system.broker.depth(commands) >= 1

    await system.wait_for(dispatched, 10, "the shipment command")
    await system.stop_engine()
    await system.start_worker("shipment")

    async def replied() -> bool:
        return system.broker.depth(system.topology.replies) >= 1

    await system.wait_for(replied, 10, "the shipment reply to wait in the broker")
    async with system.db.connect() as conn:
        (due_at,) = (await conn.execute(select(timers.c.due_at))).scalars().all()

    async def overdue() -> bool:
        return utc_now() > due_at

    await system.wait_for(overdue, 5, "the step deadline to pass")
    gate.clear()
    return saga_id


async def test_a_timeout_waits_for_a_reply_the_broker_holds(tmp_path: Path) -> None:
    gate = asyncio.Event()
    gate.set()
    async with EmbeddedSystem(
        tmp_path / "held.db",
        sagas=[_saga()],
        run_workers=["inventory", "payment"],
        transport_factory=_gated(gate),
        settings=_settings(hold=60),
    ) as system:
        saga_id = await _reply_waits_past_its_deadline(system, gate)
        engine = await system.start_engine()
        started = asyncio.get_running_loop().time()
        scans = _count_scans(engine)

        async def many_scans() -> bool:
            # Long past the settle period, and many scans: every one had the timer due.
            return scans[0] >= 30 and asyncio.get_running_loop().time() - started > 1.0

        await system.wait_for(many_scans, 20, "the engine to scan its timers")
        held = await system.client.get(saga_id)
        assert held.status is SagaStatus.RUNNING
        assert history_events(held, "step_timed_out") == []

        gate.set()
        final = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPLETED
        assert history_events(final, "step_timed_out") == []
        effect = (await system.effects())[saga_id]
        assert (effect.shipped, effect.charges, effect.refunds) == (True, 1, 0)


async def test_a_consumer_that_never_catches_up_holds_a_timeout_only_the_hold_bound(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    gate.set()
    hold = 1.5
    async with EmbeddedSystem(
        tmp_path / "bound.db",
        sagas=[_saga()],
        run_workers=["inventory", "payment"],
        transport_factory=_gated(gate),
        settings=_settings(hold=hold),
    ) as system:
        saga_id = await _reply_waits_past_its_deadline(system, gate)
        async with system.db.connect() as conn:
            (due_at,) = (await conn.execute(select(timers.c.due_at))).scalars().all()
        await system.start_engine()
        timed_out = await system.wait_status(
            saga_id,
            lambda d: "create_shipment" in history_events(d, "step_timed_out"),
            20,
            "the timeout to fire at its hold bound",
        )
        (at,) = [h.at for h in timed_out.history if h.event == "step_timed_out"]
        assert at >= due_at + timedelta(seconds=hold)

        gate.set()  # the reply comes too late: the step is compensated
        final = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPENSATED


async def test_a_timeout_with_no_reply_waiting_fires_without_waiting_for_the_bound(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    gate.set()
    async with EmbeddedSystem(
        tmp_path / "idle.db",
        sagas=[_saga()],
        run_workers=["inventory", "payment"],  # no shipment worker: no reply comes
        transport_factory=_gated(gate),
        settings=_settings(hold=60),
    ) as system:
        saga_id = await system.start_order()
        commands = system.topology.commands("shipment")

        async def dispatched() -> bool:
            return system.broker.depth(commands) >= 1

        await system.wait_for(dispatched, 10, "the shipment command")
        gate.clear()  # the consumer is held, but the broker holds no reply for it
        await system.wait_status(
            saga_id,
            lambda d: "create_shipment" in history_events(d, "step_timed_out"),
            20,  # far below the 60s hold bound
            "the timeout to fire",
        )
        gate.set()
        await system.start_worker("shipment")
        final = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPENSATED
