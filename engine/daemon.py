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
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from engine.errors import ConfigError, SagaError
from engine.retention import Pruner, PruneRule
from engine.settings import Settings
from engine.store.base import SagaStore
from engine.telemetry.logs import started
from engine.transport.base import Transport
from engine.wiring import Wiring
from engine.worker.base import Barrier

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


def barrier_pruner(barrier: Barrier, participant: str, settings: Settings) -> Pruner | None:
    """A worker's scheduled pruning: its participant's barrier rows by age."""
    keep = settings.barrier_retention
    if timedelta(0) < keep < SHORT_BARRIER_RETENTION:
        log.warning(
            "barrier retention %s is short: a duplicate command arriving later than that "
            "runs its effect twice",
            keep,
        )
    prune = functools.partial(barrier.prune, participant)
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


async def run_engine(settings: Settings, *, migrate: bool, grace: float) -> None:
    async with Wiring(settings) as wiring:
        registry = wiring.registry()
        if not len(registry):
            raise ConfigError(
                "no sagas to serve: name their modules in SAGA_SAGAS (or sagactl --sagas)"
            )
        transport = wiring.transport(wiring.engine_destinations(registry))
        if migrate:
            await wiring.migrate()
        await wiring.check_schema()
        await _connect(transport, settings.broker_url)
        engine = wiring.engine(registry, transport)
        log.info("%s", wiring.signing.describe())
        names = ", ".join(f"{s.name} v{s.version} ({s.fingerprint})" for s in registry)
        replies = wiring.topology.replies
        ready = f"engine {engine.instance_id} consuming {replies}, serving {names}"
        async with wiring.observed(
            "saga-engine",
            consuming=lambda: engine.consuming,
            broker=lambda: engine.relay.healthy,
            store=wiring.store,
        ):
            run = _alongside(engine.run, engine_pruner(wiring.store, settings))
            await _serve("engine", run, engine.stop, grace, ready)


async def run_worker(
    settings: Settings, spec: str, *, concurrency: int, migrate: bool, grace: float
) -> None:
    async with Wiring(settings) as wiring:
        [worker] = wiring.workers([spec])
        transport = wiring.transport(wiring.worker_destinations(worker.name))
        if migrate:
            await wiring.migrate()
        await wiring.check_schema()
        await _connect(transport, settings.broker_url)
        runner = wiring.worker_runner(worker, transport, concurrency=concurrency)
        log.info("%s", wiring.signing.describe())
        ready = f"worker {worker.name} consuming {runner.destination}"
        async with wiring.observed(
            f"saga-worker-{worker.name}", consuming=lambda: runner.consuming
        ):
            run = _alongside(runner.run, barrier_pruner(runner.barrier, worker.name, settings))
            await _serve(f"worker {worker.name}", run, runner.stop, grace, ready)
