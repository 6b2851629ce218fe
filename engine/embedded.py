"""Engine and workers in one process on the in-memory transport.

For the demo, for trying saga-engine with no services, and for tests: the same engine,
store and worker runtime as the daemons, only the broker is in-process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine

from engine.client import SagaClient
from engine.limits import DEFAULT_LIMITS, Limits
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.signing import NO_SIGNING, Signing
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.worker.barrier import SqlBarrier
from engine.worker.runner import WorkerRunner
from engine.worker.worker import Worker


class EmbeddedSystem:
    """``async with EmbeddedSystem(db, registry, workers) as system: system.client...``"""

    def __init__(
        self,
        database: AsyncEngine,
        registry: SagaRegistry,
        workers: Sequence[Worker],
        *,
        topology: Topology | None = None,
        engine_settings: EngineSettings | None = None,
        poll_interval: float = 0.05,
        limits: Limits = DEFAULT_LIMITS,
        signing: Signing = NO_SIGNING,
    ) -> None:
        self.database = database
        self.topology = topology or Topology()
        self.broker = MemoryBroker(dead_letters=self.topology.dead_letters)
        self.store = SqlSagaStore(database)
        transport = MemoryTransport(self.broker)
        self.engine = Engine(
            self.store,
            transport,
            registry,
            topology=self.topology,
            settings=engine_settings,
            relay=OutboxRelay(self.store, transport, poll_interval=poll_interval),
            limits=limits,
            signing=signing,
        )
        self.runners = [
            WorkerRunner(
                w,
                MemoryTransport(self.broker),
                SqlBarrier(database),
                topology=self.topology,
                limits=limits,
                signing=signing,
            )
            for w in workers
        ]
        self.client = SagaClient(
            self.store,
            registry,
            topology=self.topology,
            on_commit=self.engine.relay.wake,
            limits=limits,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.engine.transport.connect()
        for runner in self.runners:
            await runner.transport.connect()
        self._tasks = [asyncio.create_task(self.engine.run(), name="embedded-engine")]
        self._tasks += [
            asyncio.create_task(r.run(), name=f"embedded-{r.worker.name}") for r in self.runners
        ]

    async def stop(self) -> None:
        self.engine.stop()
        for runner in self.runners:
            runner.stop()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.engine.transport.close()
        for runner in self.runners:
            await runner.transport.close()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

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
