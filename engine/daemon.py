"""Foreground daemons: the orchestrator (``sagactl engine``) and a participant
(``sagactl worker NAME``).

Both stop the same way on SIGTERM or SIGINT: stop taking new messages, finish and
commit what is in flight, close the broker and database, within a grace period.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.database import check_schema, create_engine, upgrade
from engine.errors import ConfigError, SagaError
from engine.loader import load_worker
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay, RelayOptions
from engine.retention import Pruner, PruneRule
from engine.settings import Settings
from engine.store.base import SagaStore
from engine.store.postgres import outbox_signal
from engine.store.sql import SqlSagaStore
from engine.telemetry.http import Readiness, TelemetryServer
from engine.telemetry.logs import started
from engine.telemetry.monitor import watch
from engine.telemetry.setup import configure_metrics, configure_tracing
from engine.topology import Topology
from engine.transport.base import Transport
from engine.transport.factory import messaging_system, transport_from_url
from engine.worker import barrier
from engine.worker.runner import WorkerRunner

log = logging.getLogger("saga.daemon")


async def _serve(
    name: str,
    run: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], None],
    grace: float,
    ready: str,
) -> None:
    """Run until a signal, then give ``run`` ``grace`` seconds to drain."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            return
        log.info("%s: %s received, draining (grace %gs)", name, signal.Signals(signum).name, grace)
        stopping.set()
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    started()  # the libraries' startup lines, held back in case the start failed
    log.info("%s", ready)  # only now: a signal from here on drains cleanly
    task = asyncio.create_task(run(), name=name)
    signalled = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait([task, signalled], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait([task], timeout=grace)
        if not task.done():
            task.cancel()
            raise SagaError(f"{name} did not drain within the {grace:g}s grace period")
        task.result()  # a crash of the daemon's loops surfaces here
    finally:
        signalled.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("%s: stopped", name)


async def _connect(transport: Transport, url: str) -> None:
    if url.startswith("memory://"):
        log.warning(
            "broker memory:// lives inside this process: separate engine and worker "
            "processes need kafka:// or amqp://"
        )
    await transport.connect()


@asynccontextmanager
async def _observed(
    settings: Settings,
    service: str,
    *,
    ping: Callable[[], Awaitable[None]],
    consuming: Callable[[], bool],
    broker: Callable[[], bool] = lambda: True,
    store: SqlSagaStore | None = None,
) -> AsyncIterator[None]:
    """Tracing always (real trace ids; exported only if OTEL_* says so); health and
    metrics endpoints when a port is configured."""
    provider = configure_tracing(service)
    stop = asyncio.Event()
    server: TelemetryServer | None = None
    watcher: asyncio.Task[None] | None = None
    if settings.metrics_port is not None:
        configure_metrics(service)
        readiness = Readiness()
        server = TelemetryServer(settings.metrics_host, settings.metrics_port, readiness)
        server.start()
        log.info("health and metrics on http://%s:%d", settings.metrics_host, server.port)
        watcher = asyncio.create_task(
            watch(readiness, stop, ping=ping, consuming=consuming, broker=broker, store=store)
        )
    try:
        yield
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        if server is not None:
            server.stop()
        if provider is not None:
            provider.shutdown()  # flush spans still in the batch


#: A barrier retention shorter than this is almost surely a mistake (see barrier.prune).
SHORT_BARRIER_RETENTION = timedelta(days=1)


def _pruner(settings: Settings, rules: list[PruneRule]) -> Pruner | None:
    rules = [r for r in rules if r.keep > timedelta(0)]
    interval = settings.prune_interval.total_seconds()
    if not rules or interval <= 0:
        log.info("scheduled pruning is off")
        return None
    pruner = Pruner(rules, interval=interval, batch=settings.prune_batch)
    log.info("%s", pruner.describe())
    return pruner


def engine_pruner(store: SagaStore, settings: Settings) -> Pruner | None:
    """The engine's scheduled pruning: sent outbox rows and inbox rows by age."""
    return _pruner(
        settings,
        [
            PruneRule("outbox", settings.outbox_retention, store.prune_sent_outbox),
            PruneRule("inbox", settings.inbox_retention, store.prune_inbox),
        ],
    )


def barrier_pruner(database: AsyncEngine, participant: str, settings: Settings) -> Pruner | None:
    """A worker's scheduled pruning: its participant's barrier rows by age."""
    keep = settings.barrier_retention
    if timedelta(0) < keep < SHORT_BARRIER_RETENTION:
        log.warning(
            "barrier retention %s is short: a duplicate command arriving later than that "
            "runs its effect twice",
            keep,
        )
    prune = functools.partial(barrier.prune, database, participant)
    return _pruner(settings, [PruneRule("barrier", keep, prune)])


def _alongside(
    run: Callable[[], Coroutine[Any, Any, None]], pruner: Pruner | None
) -> Callable[[], Coroutine[Any, Any, None]]:
    """``run``, with the pruner's schedule going on for as long as it runs."""
    if pruner is None:
        return run

    async def both() -> None:
        stop = asyncio.Event()
        pruning = asyncio.create_task(pruner.run(stop), name="pruner")
        try:
            await run()
        finally:
            stop.set()  # a batch in flight is one short transaction
            await asyncio.wait([pruning], timeout=10)
            pruning.cancel()

    return both


def _pinger(database: AsyncEngine) -> Callable[[], Awaitable[None]]:
    async def ping() -> None:
        async with database.connect() as conn:
            await conn.execute(text("SELECT 1"))

    return ping


def engine_settings(settings: Settings) -> EngineSettings:
    """The engine's tunables that the environment sets (``SAGA_TIMEOUT_HOLD``,
    ``SAGA_TIMER_INTERVAL``, ...)."""
    return EngineSettings(
        timeout_hold=settings.timeout_hold,
        reply_settle=settings.reply_settle,
        watermark_interval=settings.watermark_interval.total_seconds(),
        timer_interval=settings.timer_interval.total_seconds(),
        timer_batch=settings.timer_batch,
    )


def relay_options(settings: Settings) -> RelayOptions:
    """The relay's tunables that the environment sets (``SAGA_RELAY_*``)."""
    return RelayOptions(
        batch_size=settings.relay_batch,
        poll_interval=settings.relay_poll_interval.total_seconds(),
        unroutable_pause=settings.relay_unroutable_pause.total_seconds(),
        max_unroutable_pause=settings.relay_max_unroutable_pause.total_seconds(),
        reader_check_delay=settings.relay_reader_check_delay.total_seconds(),
    )


async def run_engine(settings: Settings, *, migrate: bool, grace: float) -> None:
    registry = SagaRegistry.from_modules(settings.saga_modules)
    if not len(registry):
        raise ConfigError(
            "no sagas to serve: name their modules in SAGA_SAGAS (or sagactl --sagas)"
        )
    topology = Topology(settings.topic_prefix)
    signing = settings.message_signing
    database = create_engine(settings.database_url)
    participants = {step.participant for saga in registry for step in saga.steps}
    transport = transport_from_url(
        settings.broker_url,
        topology,
        kafka=settings.kafka,
        # Replies and dead letters it consumes, commands it sends.
        destinations=[
            topology.replies,
            topology.dead_letters,
            *(topology.commands(p) for p in participants),
        ],
    )
    try:
        if migrate:
            await upgrade(database)
        await check_schema(database)
        await _connect(transport, settings.broker_url)
        store = SqlSagaStore(database)
        engine = Engine(
            store,
            transport,
            registry,
            topology=topology,
            # Woken by the clients' NOTIFY on PostgreSQL, not only by its poll.
            relay=OutboxRelay(
                store, transport, signal=outbox_signal(store), **relay_options(settings)
            ),
            messaging_system=messaging_system(settings.broker_url),
            limits=settings.limits,
            settings=engine_settings(settings),
            signing=signing,
        )
        log.info("%s", signing.describe())
        names = ", ".join(f"{s.name} v{s.version}" for s in registry)
        ready = f"engine {engine.instance_id} consuming {topology.replies}, serving {names}"
        async with _observed(
            settings,
            "saga-engine",
            ping=_pinger(database),
            consuming=lambda: engine.consuming,
            broker=lambda: engine.relay.healthy,
            store=store,
        ):
            run = _alongside(engine.run, engine_pruner(store, settings))
            await _serve("engine", run, engine.stop, grace, ready)
    finally:
        await transport.close()
        await database.dispose()


async def run_worker(
    settings: Settings, spec: str, *, concurrency: int, migrate: bool, grace: float
) -> None:
    worker = load_worker(spec, settings.worker_paths)
    topology = Topology(settings.topic_prefix)
    signing = settings.message_signing
    database = create_engine(settings.database_url)
    transport = transport_from_url(
        settings.broker_url,
        topology,
        kafka=settings.kafka,
        # Commands it consumes, replies and dead letters it sends.
        destinations=[topology.commands(worker.name), topology.replies, topology.dead_letters],
    )
    try:
        if migrate:
            await upgrade(database)
        await check_schema(database)
        await _connect(transport, settings.broker_url)
        runner = WorkerRunner(
            worker,
            transport,
            database,
            topology=topology,
            concurrency=concurrency,
            messaging_system=messaging_system(settings.broker_url),
            limits=settings.limits,
            signing=signing,
        )
        log.info("%s", signing.describe())
        ready = f"worker {worker.name} consuming {runner.destination}"
        async with _observed(
            settings,
            f"saga-worker-{worker.name}",
            ping=_pinger(database),
            consuming=lambda: runner.consuming,
        ):
            run = _alongside(runner.run, barrier_pruner(database, worker.name, settings))
            await _serve(f"worker {worker.name}", run, runner.stop, grace, ready)
    finally:
        await transport.close()
        await database.dispose()
