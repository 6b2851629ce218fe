"""What every process of a deployment connects to, built from one :class:`Settings`.

The data half of the composition root (:class:`engine.wiring.Wiring` is the rest):
the database with its store and outbox signal, the broker's transports, the
destinations' names, the limits, the signing and the sagas. :class:`SagaClient`
builds on this half alone, so reading sagas loads no engine, worker or broker client.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from engine._aio import Closing
from engine.database import check_schema, create_engine, upgrade
from engine.definition import Saga
from engine.limits import Limits
from engine.registry import SagaRegistry
from engine.settings import Settings, load_settings
from engine.signing import Signing
from engine.store.base import OutboxSignal
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import Transport
from engine.transport.factory import messaging_system, transport_from_url
from engine.transport.memory import MemoryBroker, MemoryTransport


class Connections(Closing):
    """The database, store, transports and names of one process, from one Settings.

    Everything left out comes from ``settings`` (by default :func:`load_settings`: the
    ``SAGA_*`` environment and ``SAGA_<NAME>_FILE`` files). The overrides are for
    callers that hold the thing already: an open ``database`` (not disposed by
    :meth:`close`), an in-process ``broker`` (every transport is then on it, whatever
    ``SAGA_BROKER_URL`` says), ``limits`` or ``signing`` other than the settings'.
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
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        #: Destination names (``SAGA_TOPIC_PREFIX``).
        self.topology = topology or Topology(self.settings.topic_prefix)
        #: ``SAGA_MAX_MESSAGE_BYTES``: what every part built here sends and accepts.
        self.limits = limits or self.settings.limits
        #: ``SAGA_SIGNING_KEYS`` / ``SAGA_SIGNING``: the engine's and the workers'.
        self.signing = signing if signing is not None else self.settings.message_signing
        #: The in-process broker every transport is on, if one was given.
        self.broker = broker
        self._must_exist = must_exist
        self._database = database
        self._owns_database = database is None
        self._store: SqlSagaStore | None = None
        self._signal: OutboxSignal | None = None
        self._transports: list[Transport] = []

    # -- the database --------------------------------------------------------------

    @property
    def database(self) -> AsyncEngine:
        """The one database engine (pool) of this process, created on first use."""
        if self._database is None:
            self._database = create_engine(self.settings.database_url, must_exist=self._must_exist)
        return self._database

    @property
    def store(self) -> SqlSagaStore:
        """The saga store over :attr:`database`."""
        if self._store is None:
            self._store = SqlSagaStore(self.database)
        return self._store

    @property
    def signal(self) -> OutboxSignal | None:
        """Wakes relays in other processes when outbox rows commit (PostgreSQL:
        ``NOTIFY`` / ``LISTEN``); None where the database has none (SQLite)."""
        if self._signal is None:
            self._signal = self.store.outbox_signal()
        return self._signal

    async def migrate(self, scripts: Iterable[str | Path] = (), *, revision: str = "heads") -> None:
        """Create or upgrade the engine's tables (to ``revision``), then each
        participant's Alembic history in ``scripts`` (directories, or
        ``package:directory``) to its heads."""
        await upgrade(self.database, revision, scripts=scripts)

    async def check_schema(self) -> None:
        """Fail clearly if the database is not migrated to this code's schema."""
        await check_schema(self.database)

    # -- the broker ------------------------------------------------------------------

    @property
    def messaging_system(self) -> str:
        """The broker's kind, for the ``messaging.system`` trace attribute."""
        return "memory" if self.broker is not None else messaging_system(self.settings.broker_url)

    def transport(self, destinations: Iterable[str] = ()) -> Transport:
        """A transport (not connected yet) to the broker of ``SAGA_BROKER_URL`` (with
        ``SAGA_KAFKA_*``), or to the in-process broker given. ``destinations``: every
        topic the process consumes or publishes to (Kafka creates or checks them)."""
        if self.broker is not None:
            transport: Transport = MemoryTransport(self.broker)
        else:
            transport = transport_from_url(
                self.settings.broker_url,
                self.topology,
                kafka=self.settings.kafka,
                destinations=destinations,
            )
        self._transports.append(transport)
        return transport

    def engine_destinations(self, registry: SagaRegistry) -> list[str]:
        """What an engine serving ``registry`` uses: replies and dead letters it
        consumes, its participants' commands it sends."""
        participants = sorted(
            {step.participant for saga in registry for step in saga.participant_steps}
        )
        topology = self.topology
        return [topology.replies, topology.dead_letters, *map(topology.commands, participants)]

    def worker_destinations(self, participant: str) -> list[str]:
        """What a worker uses: its commands it consumes, replies and dead letters it sends."""
        topology = self.topology
        return [topology.commands(participant), topology.replies, topology.dead_letters]

    # -- the sagas -------------------------------------------------------------------

    def registry(self, sagas: Iterable[str | Saga] | None = None) -> SagaRegistry:
        """The sagas of ``sagas`` (module names, whose ``Saga`` objects register, or
        ``Saga`` objects), by default of the modules ``SAGA_SAGAS`` names."""
        wanted = list(self.settings.saga_modules if sagas is None else sagas)
        registry = SagaRegistry.from_modules(w for w in wanted if isinstance(w, str))
        for saga in wanted:
            if isinstance(saga, Saga):
                registry.register(saga)
        return registry

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close every transport built here, then the database (if created here)."""
        transports, self._transports = self._transports, []
        try:
            for transport in transports:
                await transport.close()
        finally:
            if self._owns_database and self._database is not None:
                await self._database.dispose()
            self._database = self._store = self._signal = None
