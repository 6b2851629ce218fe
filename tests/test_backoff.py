"""No hot retry loops: every retry in the system waits, and the waits are measured.

* compensation retries: spaced by the policy's capped exponential backoff (at least
  ``(1 - jitter)`` of each nominal delay, read from the saga's history timestamps),
  exactly ``max_attempts`` of them, then the saga parks and nothing spins any more;
* the outbox relay while the broker refuses: its retry interval doubles and is capped;
* the engine's loops while the database fails: one attempt per ``error_backoff``;
* the worker when its replies cannot be published, or its handler hits a constraint:
  no immediate redelivery loop.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.clock import utc_now
from engine.definition import RetryPolicy, Saga
from engine.errors import TransportError
from engine.orchestrator import EngineSettings
from engine.relay import OutboxRelay
from engine.states import SagaStatus
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.timers import StoreTimerScanner
from engine.transport.base import Message, Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.worker.worker import Registration, Worker
from sagas.order import place_order
from tests.helpers import (
    EXAMPLE_WORKERS,
    FAST_RETRY,
    ChaosTransport,
    EmbeddedSystem,
    history_events,
    order_input,
    wait_until,
)
from workers import inventory
from workers.inventory import stock

#: Five compensation attempts: nominal waits 0.1, 0.2, 0.4 then capped at 0.5.
COMPENSATION = RetryPolicy(
    max_attempts=5, initial_backoff=0.1, multiplier=2, max_backoff=0.5, jitter=0.5
)


def saga_with(compensation: RetryPolicy = COMPENSATION, retry: RetryPolicy = FAST_RETRY) -> Saga:
    return Saga(
        name=place_order.name,
        version=place_order.version,
        input=place_order.input,
        steps=[
            replace(s, retry=retry, compensation_retry=compensation, timeout=timedelta(seconds=30))
            for s in place_order.steps
        ],
    )


class Counting:
    """A copy of a worker whose handler ``name`` is counted and made to ``fail``."""

    def __init__(self, worker: Worker, name: str, fail: Any = None) -> None:
        self.calls: list[float] = []
        self.fail = fail
        self.worker = Worker(worker.name)
        for key, reg in worker.handlers.items():
            self.worker.handlers[key] = self._wrap(reg) if reg.name == name else reg

    def _wrap(self, reg: Registration) -> Registration:
        async def handler(command: Any, context: Any) -> Any:
            self.calls.append(time.monotonic())
            if self.fail is not None:
                await self.fail(command, context)
            return await reg.handler(command, context)

        return Registration(reg.name, reg.kind, reg.model, handler)


class StatementCounter:
    """Counts the SQL statements an engine issues, writes apart from reads."""

    def __init__(self, database: AsyncEngine) -> None:
        self.counts: Counter[str] = Counter()
        self.database = database
        event.listen(database.sync_engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        self.counts[verb] += 1

    def close(self) -> None:
        event.remove(self.database.sync_engine, "before_cursor_execute", self._on_execute)

    @property
    def writes(self) -> int:
        return sum(self.counts[v] for v in ("INSERT", "UPDATE", "DELETE"))

    @property
    def reads(self) -> int:
        return self.counts["SELECT"]


async def test_compensation_retries_back_off_up_to_the_cap_then_the_engine_idles(
    tmp_path: Path,
) -> None:
    async def always_fails(command: Any, context: Any) -> None:
        raise RuntimeError("release service down")

    release = Counting(inventory.worker, "release_inventory", fail=always_fails)
    workers = {**EXAMPLE_WORKERS, "inventory": release.worker}
    async with EmbeddedSystem(
        tmp_path / "backoff.db", sagas=[saga_with()], workers=workers
    ) as system:
        saga_id = await system.start_order("charge_payment")
        parked = await system.wait_status(
            saga_id, lambda d: d.status is SagaStatus.PARKED, 15, "the saga to park"
        )

        # Exactly the cap, no more: the handler ran five times, the step says so too.
        assert len(release.calls) == COMPENSATION.max_attempts
        (step,) = [s for s in parked.steps if s.name == "reserve_inventory"]
        assert step.compensation_attempts == COMPENSATION.max_attempts

        # The saga's history: one error per failed attempt but the last, which parks.
        errors = [h for h in parked.history if h.event == "compensation_error"]
        (parked_entry,) = [h for h in parked.history if h.event == "parked"]
        assert len(errors) == COMPENSATION.max_attempts - 1
        times = [h.at for h in errors] + [parked_entry.at]
        for attempt, entry in enumerate(errors, start=1):
            nominal = min(
                COMPENSATION.max_backoff,
                COMPENSATION.initial_backoff * COMPENSATION.multiplier ** (attempt - 1),
            )
            floor = (1 - COMPENSATION.jitter) * nominal
            match = re.search(r"retry in ([0-9.]+)s", entry.detail or "")
            assert match is not None, entry.detail
            assert floor - 1e-3 <= float(match.group(1)) <= nominal + 1e-3
            gap = (times[attempt] - times[attempt - 1]).total_seconds()
            assert gap >= floor, (attempt, gap, floor)
        # The handler's own clock agrees: no two attempts closer than the backoff floor.
        spacing = [b - a for a, b in itertools.pairwise(release.calls)]
        assert min(spacing) >= (1 - COMPENSATION.jitter) * COMPENSATION.initial_backoff

        # Parked: nothing keeps spinning. Over a second the engine writes nothing, sends
        # nothing, calls no handler, and only polls at its configured intervals.
        await system.quiesce(5)
        counter = StatementCounter(system.db)
        async with system.db.connect() as conn:
            rows_before = await conn.scalar(select(func.count()).select_from(outbox))
        calls_before = len(release.calls)
        window = 1.0
        started = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - started
        counter.close()
        async with system.db.connect() as conn:
            rows_after = await conn.scalar(select(func.count()).select_from(outbox))
        assert counter.writes == 0, counter.counts
        assert rows_after == rows_before
        assert len(release.calls) == calls_before
        # Polls: the timer scan every timer_interval, the relay every poll interval
        # (0.02s and 0.01s in the test system), each one SELECT; never more.
        polls_per_second = 1 / system.settings.timer_interval + 1 / 0.01
        assert counter.reads <= polls_per_second * elapsed * 1.2 + 5, counter.counts
        assert (await system.client.get(saga_id)).status is SagaStatus.PARKED


async def test_relay_backs_off_exponentially_to_its_cap_while_the_broker_refuses(
    tmp_path: Path, db: AsyncEngine
) -> None:
    store = SqlSagaStore(db)
    attempts: list[float] = []

    class Refusing(MemoryTransport):
        refuse = True

        async def publish(self, messages: Sequence[Message]) -> None:
            attempts.append(time.monotonic())
            if self.refuse:
                raise TransportError("broker refuses")
            await super().publish(messages)

    transport = Refusing(MemoryBroker())
    await transport.connect()
    async with store.transaction() as tx:
        await tx.add_raw_outbox("saga.commands.x", "k", "{}", {}, utc_now())
    relay = OutboxRelay(store, transport, poll_interval=0.01, max_backoff=0.4)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await asyncio.sleep(2.5)
    intervals = [b - a for a, b in itertools.pairwise(attempts)]
    # Nominal waits double from the first (0.1s) to the cap (0.4s) and stay there.
    nominal = [min(0.1 * 2**i, 0.4) for i in range(len(intervals))]
    assert len(intervals) >= 5, intervals
    for waited, least in zip(intervals, nominal, strict=True):
        assert waited >= least * 0.95, (intervals, nominal)  # never sooner than due
    # Capped: the waits stop growing at 0.4s (slack for a loaded machine).
    assert max(intervals) <= 0.4 + 0.3, intervals
    assert len(attempts) <= 2.5 / 0.4 + 4, attempts
    async with db.connect() as conn:
        unsent = await conn.scalar(
            select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        )
    assert unsent == 1  # nothing lost, nothing marked sent

    transport.refuse = False  # the broker is back: delivered once, and the wait resets

    async def published() -> bool:
        return relay.published == 1

    await wait_until(published, 2, "the row to be published")
    assert transport.broker.depth("saga.commands.x") == 1
    stop.set()
    await asyncio.wait_for(task, 5)
    await transport.close()


class FailingStore(SqlSagaStore):
    """A store whose database is down while ``down`` is set; counts attempts by caller."""

    def __init__(self, database: AsyncEngine) -> None:
        super().__init__(database)
        self.down = False
        self.attempts: Counter[str] = Counter()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        if self.down:
            import inspect

            caller = next(
                (f.function for f in inspect.stack()[2:8] if f.function in _LOOPS), "other"
            )
            self.attempts[caller] += 1
            raise OSError("database is down")
        async with super().transaction() as tx:
            yield tx


_LOOPS = ("_apply_one", "fire_due_timers", "relay_once", "archive", "scan")


async def test_engine_loops_pause_while_the_database_fails_and_lose_nothing(
    tmp_path: Path,
) -> None:
    backoff = 0.25
    async with EmbeddedSystem(
        tmp_path / "dbdown.db",
        run_workers=["inventory", "shipment"],
        settings=EngineSettings(
            timer_interval=0.02, unknown_saga_patience=0.5, error_backoff=backoff
        ),
    ) as system:
        failing = FailingStore(system.db)
        engine = system.engine
        assert engine is not None
        engine.store = engine.relay.store = engine.archive.store = failing
        engine.deferred.store = engine.consumer.store = failing
        assert isinstance(engine.timers, StoreTimerScanner)
        engine.timers.store = failing
        saga_id = await system.start_order()

        async def charge_waiting() -> bool:
            return system.broker.depth("saga.commands.payment") == 1

        await system.wait_for(charge_waiting, 5, "the charge command")
        failing.down = True
        await system.start_worker("payment")  # its reply arrives while the database is down
        # And a dead letter for the archive, which needs the database too.
        sender = MemoryTransport(system.broker)
        await sender.connect()
        await sender.publish([Message("saga.replies", "junk", b"not an envelope")])
        await sender.close()
        window = 1.5
        await asyncio.sleep(window)
        failing.down = False
        per_loop = window / backoff + 2
        assert 1 <= failing.attempts["_apply_one"] <= per_loop, failing.attempts
        assert 1 <= failing.attempts["fire_due_timers"] <= per_loop, failing.attempts
        assert 1 <= failing.attempts["scan"] <= per_loop, failing.attempts
        assert 1 <= failing.attempts["archive"] <= per_loop, failing.attempts
        # The relay doubles its wait from its poll interval: 0.1, 0.2, 0.4, 0.8 ...
        assert failing.attempts["relay_once"] <= 6, failing.attempts
        final = (await system.wait_all_terminal(15, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPLETED
        assert history_events(final, "step_succeeded") == [s.name for s in place_order.steps]
        (letter,) = await system.dead_letters(1)  # nothing lost either
        assert letter.body == "not an envelope"


async def test_worker_does_not_spin_when_its_replies_cannot_be_published(
    tmp_path: Path,
) -> None:
    chaos: list[ChaosTransport] = []

    def refusing_worker(broker: MemoryBroker, role: str) -> Transport:
        inner = MemoryTransport(broker)
        if role != "worker-inventory":
            return inner
        transport = ChaosTransport(inner, random.Random(0), refuse=1.0)
        chaos.append(transport)
        return transport

    reserve = Counting(inventory.worker, "reserve_inventory")
    workers = {**EXAMPLE_WORKERS, "inventory": reserve.worker}
    async with EmbeddedSystem(
        tmp_path / "noreply.db", workers=workers, transport_factory=refusing_worker
    ) as system:
        saga_id = await system.start_order()

        async def handled() -> bool:
            return bool(reserve.calls)

        await system.wait_for(handled, 5, "the command to be handled")
        await asyncio.sleep(1.0)
        # The effect ran once (the barrier answers redeliveries), and redeliveries
        # are paced instead of spinning on a broker that keeps refusing.
        assert len(reserve.calls) == 1
        assert chaos[0].refused <= 1.0 / 0.25 + 2, chaos[0].refused
        chaos[0].refuse = 0.0
        final = (await system.wait_all_terminal(15, [saga_id]))[saga_id]
        assert final.status is SagaStatus.COMPLETED
        effect = (await system.effects())[saga_id]
        assert effect.reserved == 2 and effect.charges == 1


async def test_a_constraint_violation_in_a_handler_is_a_transient_error_not_a_loop(
    tmp_path: Path,
) -> None:
    async def duplicate_row(command: Any, context: Any) -> None:
        await context.session.execute(insert(stock).values(sku="A", available=1, received=1))

    reserve = Counting(inventory.worker, "reserve_inventory", fail=duplicate_row)
    workers = {**EXAMPLE_WORKERS, "inventory": reserve.worker}
    async with EmbeddedSystem(
        tmp_path / "constraint.db", sagas=[saga_with()], workers=workers
    ) as system:
        saga_id = await system.client.start("place_order", order_input())
        final = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        # Retried per the step's policy (with its backoff), then compensated.
        assert len(reserve.calls) == FAST_RETRY.max_attempts
        assert final.status is SagaStatus.COMPENSATED
        (step,) = [s for s in final.steps if s.name == "reserve_inventory"]
        assert step.error is not None and "IntegrityError" in step.error
        await asyncio.sleep(0.5)
        assert len(reserve.calls) == FAST_RETRY.max_attempts
        assert (await system.totals()).stock_conserved
