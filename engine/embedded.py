"""Engine, workers and client in one process, on an in-process broker.

For development, for trying saga-engine with no services, for the demo and for tests of
one's own sagas: the same engine, store and worker runtime as the daemons, built by the
same :class:`~engine.wiring.Wiring`; only the broker lives in the process.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine

from engine.definition import Saga
from engine.errors import ConfigError
from engine.limits import Limits
from engine.orchestrator import Engine, EngineSettings
from engine.settings import Settings, load_settings
from engine.signing import Signing
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import Transport
from engine.transport.memory import MemoryBroker
from engine.wiring import Wiring
from engine.worker.runner import WorkerRunner
from engine.worker.worker import Worker

#: Builds the transport of one part (``"engine"``, ``"worker-NAME"``) on the broker:
#: a test wraps it to inject faults.
TransportFactory = Callable[[MemoryBroker, str], Transport]


class EmbeddedSystem:
    """The engine, workers and a client in one process, for development and tests::

        async with EmbeddedSystem(
            sagas=["myapp.sagas.trip"],                # or Saga objects; default SAGA_SAGAS
            workers=["myapp.workers.hotel:worker"],    # or Worker objects; default SAGA_WORKERS
            database_url="sqlite:///dev.db",           # default SAGA_DATABASE_URL
            migrations=[Path("myapp/migrations")],     # participants' Alembic histories
        ) as system:
            saga_id = await system.client.start("book_trip", {"guest": "ada"})
            detail = await system.client.wait(saga_id, timeout=30)

    Settings not given come from ``settings`` (default: the ``SAGA_*`` environment),
    except the broker: always an in-process one, whatever ``SAGA_BROKER_URL`` says.
    With ``migrate`` (the default) :meth:`start` creates or upgrades the engine's
    tables and the ``migrations`` histories; without, it checks the schema.

    Tests drive the parts one by one: :meth:`start_engine`, :meth:`stop_engine` (or
    crash it with ``crash=True``), :meth:`restart_engine`, :meth:`start_worker`,
    :meth:`stop_worker`; ``transport_factory`` wraps each part's transport, ``seed``
    makes the engines' jitter reproducible.
    """

    def __init__(
        self,
        *,
        sagas: Iterable[str | Saga] | None = None,
        workers: Iterable[str | Worker] | None = None,
        settings: Settings | None = None,
        database_url: str | None = None,
        migrate: bool = True,
        migrations: Iterable[str | Path] = (),
        database: AsyncEngine | None = None,
        tunables: EngineSettings | None = None,
        poll_interval: float | None = None,
        limits: Limits | None = None,
        signing: Signing | None = None,
        transport_factory: TransportFactory | None = None,
        seed: int | None = None,
    ) -> None:
        settings = settings if settings is not None else load_settings()
        if database_url is not None:
            settings = settings.model_copy(update={"database_url": database_url})
        topology = Topology(settings.topic_prefix)
        #: The in-process broker every part's transport is on.
        self.broker = MemoryBroker(dead_letters=topology.dead_letters)
        #: Builds every part; its settings are this system's.
        self.wiring = Wiring(
            settings,
            database=database,
            broker=self.broker,
            topology=topology,
            limits=limits,
            signing=signing,
            tunables=tunables,
            poll_interval=poll_interval,
        )
        self.topology = topology
        self.registry = self.wiring.registry(sagas)
        #: The workers by participant name (a test may swap one before starting it).
        self.workers: dict[str, Worker] = {}
        for worker in self.wiring.workers(workers):
            if worker.name in self.workers:
                raise ConfigError(f"two workers for participant {worker.name!r}")
            self.workers[worker.name] = worker
        #: The signing of the engines and workers started from now on.
        self.signing = self.wiring.signing
        self.migrate = migrate
        self.migrations = list(migrations)
        self.transport_factory = transport_factory
        #: Starts sagas (waking this process's engine) and reads them.
        self.client = self.wiring.client(self.registry, on_commit=self._wake)
        #: The running engine, if any.
        self.engine: Engine | None = None
        self.engine_task: asyncio.Task[None] | None = None
        self.engines_started = 0
        #: The running workers' runtimes by participant name.
        self.runners: dict[str, WorkerRunner] = {}
        self.worker_tasks: dict[str, asyncio.Task[None]] = {}
        #: Every transport built so far (closed by :meth:`stop`).
        self.transports: list[Transport] = []
        self._rng = random.Random(seed) if seed is not None else None

    @property
    def database(self) -> AsyncEngine:
        """The database the engine, the workers and the client share (to read a
        participant's tables in a test, say)."""
        return self.wiring.database

    @property
    def store(self) -> SqlSagaStore:
        """The engine's saga store over that database."""
        return self.wiring.store

    # -- the whole system ------------------------------------------------------------

    async def start(self) -> None:
        """Migrate (or check) the database, then start the engine and every worker."""
        try:
            if self.migrate:
                await self.wiring.migrate(self.migrations)
            else:
                await self.wiring.check_schema()
            await self.start_engine()
            for name in self.workers:
                await self.start_worker(name)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the engine and the workers (each finishes what it has in hand), close
        the transports and the database; raise the first error one of them died of."""
        errors: list[BaseException] = []
        if self.engine is not None:
            errors += await self._stop_engine(crash=False)
        for name in list(self.runners):
            errors += await self._stop_worker(name)
        transports, self.transports = self.transports, []
        for transport in transports:
            await transport.close()
        await self.wiring.close()
        if errors:
            raise errors[0]

    async def __aenter__(self) -> EmbeddedSystem:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the parts -----------------------------------------------------------------

    async def _transport(self, role: str, destinations: list[str]) -> Transport:
        if self.transport_factory is None:
            transport = self.wiring.transport(destinations)
        else:
            transport = self.transport_factory(self.broker, role)
        self.transports.append(transport)
        await transport.connect()
        return transport

    def _wake(self) -> None:
        if self.engine is not None:
            self.engine.relay.wake()

    async def start_engine(self) -> Engine:
        """Start an engine (there must be none running) over the same database."""
        if self.engine is not None:
            raise RuntimeError("an engine is already running")
        transport = await self._transport("engine", self.wiring.engine_destinations(self.registry))
        self.engines_started += 1
        rng = random.Random(self._rng.random()) if self._rng is not None else None
        engine = self.wiring.engine(
            self.registry,
            transport,
            rng=rng,
            instance_id=f"embedded-engine-{self.engines_started}",
            signing=self.signing,
        )
        self.engine = engine
        self.engine_task = asyncio.create_task(engine.run(), name="embedded-engine")
        return engine

    async def _stop_engine(self, *, crash: bool) -> list[BaseException]:
        engine, task = self.engine, self.engine_task
        if engine is None or task is None:
            raise RuntimeError("no engine is running")
        self.engine = self.engine_task = None
        if crash:
            task.cancel()
        else:
            engine.stop()
        return _errors(await asyncio.gather(task, return_exceptions=True))

    async def stop_engine(self, *, crash: bool = False) -> None:
        """Stop the engine: it finishes its batch; with ``crash``, it is cancelled
        wherever it is, as a killed process would stop."""
        errors = await self._stop_engine(crash=crash)
        if errors:
            raise errors[0]

    async def restart_engine(self, *, crash: bool = False) -> Engine:
        """Stop (or crash) the engine and start a new one over the same database."""
        await self.stop_engine(crash=crash)
        return await self.start_engine()

    async def start_worker(self, name: str, *, signing: Signing | None = None) -> WorkerRunner:
        """Start the worker of participant ``name`` (with ``signing`` of its own)."""
        if name in self.runners:
            raise RuntimeError(f"worker {name} already runs")
        worker = self.workers[name]
        transport = await self._transport(
            f"worker-{name}", self.wiring.worker_destinations(worker.name)
        )
        runner = self.wiring.worker_runner(
            worker, transport, signing=self.signing if signing is None else signing
        )
        self.runners[name] = runner
        self.worker_tasks[name] = asyncio.create_task(runner.run(), name=f"embedded-{name}")
        return runner

    async def _stop_worker(self, name: str) -> list[BaseException]:
        runner, task = self.runners.pop(name), self.worker_tasks.pop(name)
        runner.stop()
        return _errors(await asyncio.gather(task, return_exceptions=True))

    async def stop_worker(self, name: str) -> None:
        """Stop one worker: it finishes and commits what it has in hand."""
        errors = await self._stop_worker(name)
        if errors:
            raise errors[0]

    def check_tasks(self) -> None:
        """Raise the error an engine or worker task died of, if one did."""
        tasks = [self.engine_task] if self.engine_task is not None else []
        for task in [*tasks, *self.worker_tasks.values()]:
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error


def _errors(results: Iterable[BaseException | None]) -> list[BaseException]:
    return [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
