"""Shared test machinery: an embedded engine + workers, chaos transports, polling.

Everything here runs in one event loop on a temp SQLite file and a MemoryBroker, with
short engine intervals; waiting is always polling against a deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from engine import embedded
from engine.database import create_engine, upgrade
from engine.definition import Delay, Local, Parallel, RetryPolicy, Saga, Step, WaitFor
from engine.embedded import TransportFactory
from engine.errors import TransportError
from engine.messages import Envelope, MessageKind, decode
from engine.orchestrator import EngineSettings
from engine.settings import load_settings
from engine.signing import NO_SIGNING, Signing
from engine.states import SagaStatus, StepStatus
from engine.store.schema import outbox
from engine.transport.base import Message, Subscription, Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.views import DeadLetterView, SagaDetail
from engine.worker.runner import WorkerRunner
from engine.worker.worker import Registration, Worker
from sagas.large_order import large_order
from sagas.order import place_order
from workers import inventory, ledger, payment, shipment

EXAMPLE_WORKERS: dict[str, Worker] = {
    "inventory": inventory.worker,
    "payment": payment.worker,
    "shipment": shipment.worker,
}

DEFAULT_STOCK = {"A": 1000, "SCARCE": 0}
DEFAULT_BALANCES = {"alice": 10_000_000, "poor": 0}

#: The order saga with retries fast enough for tests (same steps, commands, names).
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, jitter=0.5)
FAST_COMPENSATION_RETRY = RetryPolicy(
    max_attempts=20, initial_backoff=0.01, max_backoff=0.1, jitter=0.5
)


def fast_order_saga(timeout: float = 30.0) -> Saga:
    return Saga(
        name=place_order.name,
        version=place_order.version,
        input=place_order.input,
        steps=[
            replace(
                step,
                retry=FAST_RETRY,
                compensation_retry=FAST_COMPENSATION_RETRY,
                timeout=timedelta(seconds=timeout),
            )
            for step in place_order.steps
        ],
    )


def fast_large_order_saga(approval_timeout: float = 30.0, timeout: float = 30.0) -> Saga:
    """The large order with fast retries, a short cooling-off and the given approval
    timeout (same structure, names and commands)."""

    def fast(node: Any) -> Any:
        if isinstance(node, Step):
            return replace(
                node,
                retry=FAST_RETRY,
                compensation_retry=FAST_COMPENSATION_RETRY,
                timeout=timedelta(seconds=timeout),
            )
        if isinstance(node, WaitFor):
            return replace(node, timeout=timedelta(seconds=approval_timeout))
        if isinstance(node, Delay):
            return replace(node, duration=timedelta(seconds=0.05))
        if isinstance(node, Local):
            return replace(node, retry=FAST_RETRY)
        assert isinstance(node, Parallel)
        return replace(node, branches=[[fast(n) for n in branch] for branch in node.branches])

    return Saga(
        name=large_order.name,
        version=large_order.version,
        input=large_order.input,
        steps=[fast(element) for element in large_order.steps],
    )


ORDER_STEPS = [s.name for s in place_order.steps]
PRICE = 1250
QUANTITY = 2


def order_input(fail_at: str | None = None, **overrides: Any) -> dict[str, Any]:
    """An order that succeeds, or fails for a business reason at step ``fail_at``."""
    data: dict[str, Any] = {
        "customer_id": "alice",
        "sku": "A",
        "quantity": QUANTITY,
        "amount_cents": PRICE,
        "address": "1 Main St",
    }
    if fail_at == "reserve_inventory":
        data["sku"] = "SCARCE"
    elif fail_at == "charge_payment":
        data["customer_id"] = "poor"
    elif fail_at == "create_shipment":
        data["address"] = "nowhere"
    elif fail_at is not None:
        raise ValueError(fail_at)
    data.update(overrides)
    return data


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    check: Callable[[], None] | None = None,
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if check is not None:
            check()
        if await predicate():
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def settled(status: SagaStatus) -> bool:
    return status.is_terminal or status is SagaStatus.PARKED


def envelopes(messages: Iterable[Message]) -> list[Envelope]:
    return [decode(m.body) for m in messages]


# -- chaos ---------------------------------------------------------------------------


class ChaosTransport:
    """A transport that duplicates, delays (hence reorders) and refuses publishes.

    Duplicates keep the message id, like a broker redelivering or a producer retrying.
    A refused publish raises TransportError, as a broker without confirmation would.
    Delayed messages are published later by a background task; ``flush`` waits for them.
    """

    def __init__(
        self,
        inner: Transport,
        rng: random.Random,
        *,
        duplicate: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.1,
        refuse: float = 0.0,
    ) -> None:
        self.inner = inner
        self.rng = rng
        self.duplicate = duplicate
        self.delay = delay
        self.max_delay = max_delay
        self.refuse = refuse
        self.pending: set[asyncio.Task[None]] = set()
        self.duplicated = 0
        self.delayed = 0
        self.refused = 0

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, messages: Sequence[Message]) -> None:
        if messages and self.rng.random() < self.refuse:
            self.refused += 1
            raise TransportError("chaos: broker refused the publish")
        now: list[Message] = []
        for message in messages:
            copies = 2 if self.rng.random() < self.duplicate else 1
            self.duplicated += copies - 1
            for _ in range(copies):
                if self.rng.random() < self.delay:
                    self.delayed += 1
                    self._later(message, self.rng.uniform(0, self.max_delay))
                else:
                    now.append(message)
        if now:
            await self.inner.publish(now)

    def _later(self, message: Message, seconds: float) -> None:
        async def go() -> None:
            await asyncio.sleep(seconds)
            await self.inner.publish([message])

        task = asyncio.create_task(go())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def subscribe(self, destination: str, *, group: str) -> Subscription:
        return await self.inner.subscribe(destination, group=group)


def flaky_worker(worker: Worker, rng: random.Random, error_rate: float) -> Worker:
    """A copy of ``worker`` whose handlers raise (after their writes) at ``error_rate``.

    The raise happens inside the worker's transaction, so the writes roll back and the
    runtime replies a transient error: the engine must retry.
    """
    copy = Worker(worker.name)
    for key, reg in worker.handlers.items():

        def wrap(reg: Registration) -> Registration:
            async def handler(command: Any, context: Any) -> Any:
                result = await reg.handler(command, context)
                if rng.random() < error_rate:
                    raise RuntimeError(f"chaos: {reg.name} crashed after its writes")
                return result

            return Registration(reg.name, reg.kind, reg.model, handler)

        copy.handlers[key] = wrap(reg)
    return copy


# -- the embedded system ---------------------------------------------------------------


def memory_transport(broker: MemoryBroker, role: str) -> Transport:
    return MemoryTransport(broker)


class EmbeddedSystem(embedded.EmbeddedSystem):
    """The public embedded runner on a temp SQLite file (or ``database_url``), set up
    for the example.

    ``async with EmbeddedSystem(path) as system:`` migrates (the engine's and the
    example's histories) and seeds the database, then starts the engine and the
    workers named in ``run_workers``, with short engine intervals. The engine can be
    stopped (or crashed) and restarted over the same database and broker; workers can
    be started later than the engine, each with a signing of its own.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        database_url: str | None = None,
        sagas: Sequence[Saga] = (place_order,),
        workers: Mapping[str, Worker] | None = None,
        run_workers: Iterable[str] | None = None,
        stock: Mapping[str, int] = DEFAULT_STOCK,
        balances: Mapping[str, int] = DEFAULT_BALANCES,
        transport_factory: TransportFactory = memory_transport,
        settings: EngineSettings | None = None,
        seed: int = 0,
        signing: Signing = NO_SIGNING,
    ) -> None:
        self.db_path = db_path
        # In one process nothing republishes replies after an outage: a short settle.
        self.settings = settings or EngineSettings(
            timer_interval=0.02,
            unknown_saga_patience=0.5,
            reply_settle=timedelta(seconds=0.1),
            watermark_interval=0.02,
        )
        workers = EXAMPLE_WORKERS if workers is None else workers
        super().__init__(
            sagas=sagas,
            workers=list(workers.values()),
            settings=load_settings(database_url=database_url or f"sqlite:///{db_path}"),
            migrations=[ledger.MIGRATIONS],
            tunables=self.settings,
            poll_interval=0.01,
            signing=signing,
            transport_factory=transport_factory,
            seed=seed,
        )
        self.workers = dict(workers)  # by the names the test gave them
        self.initial_workers = list(self.workers if run_workers is None else run_workers)
        self.stock = stock
        self.balances = balances
        #: Per worker, a signing other than :attr:`signing` (the engine's).
        self.workers_signing: dict[str, Signing] = {}

    @property
    def db(self) -> AsyncEngine:
        return self.database

    async def start(self) -> None:
        try:
            await self.wiring.migrate(self.migrations)
            await ledger.seed(self.db, stock_by_sku=self.stock, balances=self.balances)
            await self.start_engine()
            for name in self.initial_workers:
                await self.start_worker(name)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for transport in self.transports:  # a ChaosTransport's delayed publishes
            for task in list(getattr(transport, "pending", ())):
                task.cancel()
        await super().stop()

    async def start_worker(self, name: str, *, signing: Signing | None = None) -> WorkerRunner:
        if signing is None:
            signing = self.workers_signing.get(name, self.signing)
        return await super().start_worker(name, signing=signing)

    # -- sagas ---------------------------------------------------------------------

    async def start_order(self, fail_at: str | None = None, **overrides: Any) -> str:
        return await self.client.start("place_order", order_input(fail_at, **overrides))

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], timeout: float, what: str
    ) -> None:
        await wait_until(predicate, timeout, what, check=self.check_tasks)

    async def wait_status(
        self, saga_id: str, accept: Callable[[SagaDetail], bool], timeout: float, what: str
    ) -> SagaDetail:
        found: list[SagaDetail] = []

        async def ready() -> bool:
            detail = await self.client.get(saga_id)
            found[:] = [detail]
            return accept(detail)

        await self.wait_for(ready, timeout, what)
        return found[0]

    async def wait_all_terminal(
        self, timeout: float, saga_ids: Sequence[str] | None = None
    ) -> dict[str, SagaDetail]:
        """Wait until every saga (or the given ones) is COMPLETED, COMPENSATED or PARKED."""

        async def done() -> bool:
            sagas = await self.store.list_sagas(limit=100_000)
            wanted = {s.id: s.status for s in sagas}
            ids = saga_ids if saga_ids is not None else list(wanted)
            return all(i in wanted and settled(wanted[i]) for i in ids)

        await self.wait_for(done, timeout, "every saga to settle")
        sagas = await self.store.list_sagas(limit=100_000)
        ids = saga_ids if saga_ids is not None else [s.id for s in sagas]
        return {i: await self.client.get(i) for i in ids}

    async def quiesce(self, timeout: float, *, calm_polls: int = 3) -> None:
        """Wait until nothing moves: no delayed publish pending, every queue empty,
        every outbox row sent, and no counter changed over ``calm_polls`` polls."""
        destinations = [self.topology.replies] + [
            self.topology.commands(name) for name in self.workers
        ]
        last: tuple[int, ...] | None = None
        calm = 0

        async def quiet() -> bool:
            nonlocal last, calm
            pending = sum(len(getattr(t, "pending", ())) for t in self.transports)
            async with self.db.connect() as conn:
                unsent = await conn.scalar(
                    select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
                )
            engine = self.engine
            snapshot = (
                sum(r.handled for r in self.runners.values()),
                engine.replies_handled if engine else -1,
                engine.timers_fired if engine else -1,
                engine.relay.published if engine else -1,
            )
            idle = (
                pending == 0
                and unsent == 0
                and all(self.broker.depth(d) == 0 for d in destinations)
            )
            calm = calm + 1 if idle and snapshot == last else 0
            last = snapshot
            return calm >= calm_polls

        await wait_until(
            quiet, timeout, "the system to quiesce", interval=0.03, check=self.check_tasks
        )

    async def totals(self) -> ledger.LedgerTotals:
        return await ledger.totals(self.db)

    async def effects(self) -> dict[str, ledger.OrderEffect]:
        return await ledger.effects(self.db)

    async def dead_letters(self, count: int = 0, timeout: float = 10) -> list[DeadLetterView]:
        """The dead letters the engine archived, oldest first; waits for ``count``."""
        letters: list[DeadLetterView] = []

        async def enough() -> bool:
            letters[:] = reversed(await self.client.dead_letters(limit=100_000))
            return len(letters) >= count

        await self.wait_for(enough, timeout, f"{count} archived dead letter(s)")
        return letters

    def command_envelopes(self, participant: str) -> list[Envelope]:
        """Drain the commands waiting for ``participant`` (its worker must be stopped)."""
        return envelopes(self.broker.drain(self.topology.commands(participant)))


def history_events(detail: SagaDetail, event: str) -> list[str | None]:
    return [h.step for h in detail.history if h.event == event]


def kinds(messages: Iterable[Envelope]) -> list[tuple[str, MessageKind, int]]:
    return [(m.step, m.kind, m.attempt) for m in messages]


# -- invariants ------------------------------------------------------------------------


def may_have_run(detail: SagaDetail) -> set[str]:
    """Steps whose effect may exist: they succeeded, timed out, or ran out of retries."""
    steps = {str(h.step) for h in detail.history if h.event in ("step_succeeded", "step_timed_out")}
    steps |= {
        str(h.step)
        for h in detail.history
        if h.event == "step_failed" and (h.detail or "").startswith("gave up")
    }
    return steps


def assert_compensated_in_reverse(detail: SagaDetail) -> None:
    """Each step that may have run is compensated exactly once, last step first."""
    done = history_events(detail, "step_compensated")
    assert len(done) == len(set(done)), f"a step was compensated twice: {done}"
    positions = [ORDER_STEPS.index(str(s)) for s in done]
    assert positions == sorted(positions, reverse=True), f"not in reverse order: {done}"
    if detail.status is SagaStatus.COMPLETED:
        assert done == []
    elif detail.status is SagaStatus.COMPENSATED:
        assert set(done) == may_have_run(detail)
        compensated = {s.name for s in detail.steps if s.status is StepStatus.COMPENSATED}
        assert compensated == set(done)


def assert_books_balance(detail: SagaDetail, effect_of: Mapping[str, ledger.OrderEffect]) -> None:
    """One order's net effect on the participants' books matches how its saga ended."""
    effect = effect_of.get(detail.id, ledger.OrderEffect())
    assert effect.charges <= 1, f"order {detail.id} was charged {effect.charges} times"
    assert effect.refunds <= 1, f"order {detail.id} was refunded {effect.refunds} times"
    if detail.status is SagaStatus.COMPLETED:
        assert effect == ledger.OrderEffect(
            reserved=QUANTITY, net_charged_cents=PRICE, charges=1, refunds=0, shipped=True
        )
    else:
        assert detail.status is SagaStatus.COMPENSATED, detail.error
        assert effect.reserved == 0
        assert effect.net_charged_cents == 0
        assert effect.charges == effect.refunds
        assert not effect.shipped


@dataclass
class FakeDelivery:
    """A delivery that records how a consumer (engine, runner, archive) settled it."""

    message: Message
    redelivered: bool = False
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self) -> None:
        self.settled.append("nack")

    async def dead_letter(self, reason: str) -> None:
        self.settled.append(f"dead_letter: {reason}")


def charge_command(
    saga_id: str = "o1",
    attempt: int = 1,
    customer: str = "alice",
    amount: int = 700,
    headers: dict[str, str] | None = None,
) -> Envelope:
    """The example's ``charge_payment`` command, as the order saga sends it (or as a
    forger on the broker would, for a saga that does not exist)."""
    return Envelope(
        saga_id=saga_id,
        saga_name="place_order",
        saga_version=1,
        step="charge_payment",
        kind=MessageKind.COMMAND,
        name="charge_payment",
        attempt=attempt,
        payload={"order_id": saga_id, "customer_id": customer, "amount_cents": amount},
        headers=headers or {},
    )


def migrated_sqlite(path: Path) -> Path:
    """A SQLite file at ``path`` with the engine's tables: for the CLI tests, which
    run ``sagactl`` (its own event loop) on it."""

    async def migrate() -> None:
        database = create_engine(f"sqlite:///{path}")
        try:
            await upgrade(database)
        finally:
            await database.dispose()

    asyncio.run(migrate())
    return path


def chaotic_transports(
    rng: random.Random, *, duplicate: float, delay: float, refuse: float
) -> TransportFactory:
    """A transport factory for the property tests: in-process transports that
    duplicate, delay (so reorder) and refuse publishes, each with its own seed."""

    def chaotic(broker: MemoryBroker, role: str) -> Transport:
        return ChaosTransport(
            MemoryTransport(broker),
            random.Random(rng.random()),
            duplicate=duplicate,
            delay=delay,
            max_delay=0.25,
            refuse=refuse,
        )

    return chaotic


def flaky_workers(
    workers: Mapping[str, Worker], rng: random.Random, error_rate: float
) -> dict[str, Worker]:
    """Each worker made flaky (:func:`flaky_worker`) with its own seed."""
    return {
        name: flaky_worker(worker, random.Random(rng.random()), error_rate)
        for name, worker in workers.items()
    }
