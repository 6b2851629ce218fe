"""The composition root: every part a process runs, built from one :class:`Settings`.

The daemons (``sagactl engine`` / ``worker``), the embedded runner, the demo,
:meth:`SagaClient.connect <engine.client.SagaClient.connect>` and the benchmark all
build here, so an ``Engine``, a ``WorkerRunner`` or a client gets the same database,
prefix, limits, signing and tunables wherever it runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.client import SagaClient
from engine.connections import Connections
from engine.limits import Limits
from engine.loader import load_worker
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay, RelayOptions
from engine.settings import Settings
from engine.signing import Signing
from engine.store.queries import SagaQueries
from engine.topology import Topology
from engine.transport.base import Transport
from engine.transport.memory import MemoryBroker
from engine.worker.barrier import SqlBarrier
from engine.worker.runner import WorkerRunner
from engine.worker.worker import Worker

log = logging.getLogger("saga.wiring")


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
        unroutable_timeout=settings.relay_unroutable_timeout.total_seconds(),
        reader_check_delay=settings.relay_reader_check_delay.total_seconds(),
    )


class Wiring(Connections):
    """Builds the engine, the worker runtime and the client of one process, from one
    :class:`~engine.settings.Settings` (by default the ``SAGA_*`` environment)::

        async with Wiring() as wiring:                    # SAGA_DATABASE_URL, ...
            await wiring.migrate()
            registry = wiring.registry()                   # SAGA_SAGAS
            transport = wiring.transport(wiring.engine_destinations(registry))
            await transport.connect()
            engine = wiring.engine(registry, transport)
            await engine.run()

    Besides :class:`~engine.connections.Connections`' overrides, a caller may give
    the engine's ``tunables`` and the relay's ``poll_interval`` (by default both
    mapped from the settings: ``SAGA_TIMER_*``, ``SAGA_RELAY_*``, ...).
    :meth:`close` closes every transport built here and the database.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        database: AsyncEngine | None = None,
        must_exist: bool = False,
        broker: MemoryBroker | None = None,
        topology: Topology | None = None,
        limits: Limits | None = None,
        signing: Signing | None = None,
        tunables: EngineSettings | None = None,
        poll_interval: float | None = None,
    ) -> None:
        super().__init__(
            settings,
            database=database,
            must_exist=must_exist,
            broker=broker,
            topology=topology,
            limits=limits,
            signing=signing,
        )
        #: The engine's tunables: ``tunables``, else mapped from the settings.
        self.engine_settings = tunables or engine_settings(self.settings)
        #: The relay's tunables (``SAGA_RELAY_*``), with ``poll_interval`` if given.
        self.relay_options = relay_options(self.settings)
        if poll_interval is not None:
            self.relay_options["poll_interval"] = poll_interval

    def workers(self, specs: Iterable[str | Worker] | None = None) -> list[Worker]:
        """The workers of ``specs`` (``module:attr`` paths, participant names listed in
        ``SAGA_WORKERS``, or ``Worker`` objects), by default every one of ``SAGA_WORKERS``."""
        known = self.settings.worker_paths
        wanted = known if specs is None else specs
        return [w if isinstance(w, Worker) else load_worker(w, known) for w in wanted]

    def engine(
        self,
        registry: SagaRegistry,
        transport: Transport,
        *,
        rng: random.Random | None = None,
        instance_id: str | None = None,
        signing: Signing | None = None,
    ) -> Engine:
        """An engine serving ``registry`` over ``transport``, with its relay (woken by
        the outbox signal of other processes' commits), limits, signing and tunables.
        ``rng`` and ``instance_id`` make a test's engines reproducible."""
        return Engine(
            self.store,
            transport,
            registry,
            topology=self.topology,
            settings=self.engine_settings,
            relay=OutboxRelay(self.store, transport, signal=self.signal, **self.relay_options),
            rng=rng,
            instance_id=instance_id,
            messaging_system=self.messaging_system,
            limits=self.limits,
            signing=self.signing if signing is None else signing,
        )

    def worker_runner(
        self,
        worker: Worker,
        transport: Transport,
        *,
        concurrency: int = 1,
        signing: Signing | None = None,
    ) -> WorkerRunner:
        """The runtime of ``worker`` over ``transport``: its handlers' transactions on
        this database, ``concurrency`` of them at a time."""
        return WorkerRunner(
            worker,
            transport,
            SqlBarrier(self.database),
            topology=self.topology,
            concurrency=concurrency,
            messaging_system=self.messaging_system,
            limits=self.limits,
            signing=self.signing if signing is None else signing,
        )

    def client(
        self,
        registry: SagaRegistry | None = None,
        *,
        on_commit: Callable[[], None] | None = None,
    ) -> SagaClient:
        """A client over this database serving ``registry`` (default: ``SAGA_SAGAS``);
        ``on_commit`` wakes an engine of this process after a start committed."""
        return SagaClient.over(
            self, self.registry() if registry is None else registry, on_commit=on_commit
        )

    @asynccontextmanager
    async def observed(
        self,
        service: str,
        *,
        consuming: Callable[[], bool],
        broker: Callable[[], bool] = lambda: True,
        store: SagaQueries | None = None,
    ) -> AsyncIterator[None]:
        """Telemetry for as long as a daemon runs: tracing always (real trace ids;
        exported only if ``OTEL_*`` says so); health and metrics endpoints when
        ``SAGA_METRICS_PORT`` is set, ready while ``consuming()`` and ``broker()`` and
        the database answers (and, given the engine's ``store``, saga gauges)."""
        with self.traced(service):
            async with self._health(service, consuming=consuming, broker=broker, store=store):
                yield

    @contextmanager
    def traced(self, service: str) -> Iterator[None]:
        """Tracing as ``service`` for as long as the block runs, as every daemon traces:
        sagas started or advanced here record a real trace id even when no exporter is
        configured; spans go where ``OTEL_*`` says (by default nowhere) and are flushed
        on the way out."""
        from engine.telemetry.setup import configure_tracing

        provider = configure_tracing(service)
        try:
            yield
        finally:
            if provider is not None:
                provider.shutdown()  # flush spans still in the batch

    @asynccontextmanager
    async def _health(
        self,
        service: str,
        *,
        consuming: Callable[[], bool],
        broker: Callable[[], bool],
        store: SagaQueries | None,
    ) -> AsyncIterator[None]:
        """The health and metrics endpoints of :meth:`observed`, if a port is set."""
        from engine.telemetry.http import Readiness, TelemetryServer
        from engine.telemetry.monitor import watch
        from engine.telemetry.setup import configure_metrics

        settings = self.settings
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
                watch(
                    readiness,
                    stop,
                    ping=self._ping,
                    consuming=consuming,
                    broker=broker,
                    store=store,
                )
            )
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                await watcher
            if server is not None:
                server.stop()

    async def _ping(self) -> None:
        async with self.database.connect() as conn:
            await conn.execute(text("SELECT 1"))
