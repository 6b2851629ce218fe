"""The relay woken across processes on PostgreSQL (LISTEN / NOTIFY).

A client in another process commits a saga's first command to the outbox; the
engine's relay must publish it at once instead of at its next poll. Every relay here
polls only every 60 seconds, so a row published within the test's bound was
published because of the notification; and only a committed transaction may wake it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.client import SagaClient
from engine.database import create_engine
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.store.postgres import CHANNEL, PgOutboxSignal, outbox_signal
from engine.store.sql import SqlSagaStore
from engine.transport.base import Message
from sagas.order import place_order
from tests.e2e import Cluster, fresh_database, service_url, wait_until
from tests.helpers import order_input

pytestmark = pytest.mark.integration

#: The relay's poll: far longer than any wait below.
POLL = 60.0
#: How long a notified relay may take here (a loaded 2-core box): well under POLL.
BOUND = 10.0


class Recorder:
    """A transport that confirms every publish and remembers it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, messages: Sequence[Message]) -> None:
        self.messages += messages
        self.arrived.set()

    async def subscribe(self, destination: str, *, group: str) -> object:
        raise NotImplementedError


@dataclass
class RelayProcess:
    """The engine side: its own database engine, a relay, and its LISTEN signal."""

    relay: OutboxRelay
    signal: PgOutboxSignal
    transport: Recorder

    async def published(self, count: int, within: float = BOUND) -> list[Message]:
        async def enough() -> None:
            while len(self.transport.messages) < count:
                self.transport.arrived.clear()
                await self.transport.arrived.wait()

        await asyncio.wait_for(enough(), within)
        return self.transport.messages


async def until(check: Callable[[], bool], within: float = BOUND) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110  # state of another task, no event to wait on
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), within)


@asynccontextmanager
async def relay_on(url: str, **signal_settings: float) -> AsyncIterator[RelayProcess]:
    database = create_engine(url)
    store = SqlSagaStore(database)
    signal = PgOutboxSignal(database, **signal_settings)
    transport = Recorder()
    relay = OutboxRelay(store, transport, poll_interval=POLL, signal=signal)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await until(lambda: signal.listening)
        # The relay's first pass (an empty outbox) is over: from here it sleeps a poll.
        await asyncio.sleep(0.2)
        yield RelayProcess(relay, signal, transport)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await database.dispose()


@asynccontextmanager
async def client_on(url: str) -> AsyncIterator[SagaClient]:
    """A client with a database engine of its own, as in another process."""
    client = SagaClient(SqlSagaStore(create_engine(url)), SagaRegistry([place_order]))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        yield url


async def test_a_saga_started_elsewhere_is_published_long_before_the_poll(pg_url: str) -> None:
    async with relay_on(pg_url) as engine, client_on(pg_url) as client:
        assert isinstance(client.outbox_signal, PgOutboxSignal)  # picked from the store
        saga_id = await client.start("place_order", order_input())
        [command] = await engine.published(1)
        assert command.key == saga_id
        second = await client.start("place_order", order_input())
        assert (await engine.published(2))[1].key == second
        assert engine.signal.received >= 2


async def test_without_the_notification_the_row_waits_for_the_poll(pg_url: str) -> None:
    """The control: the same commit without NOTIFY is not published before the poll,
    so the test above measures the notification and not something else."""
    async with relay_on(pg_url) as engine, client_on(pg_url) as client:
        client.outbox_signal = None
        await client.start("place_order", order_input())
        await asyncio.sleep(1.0)
        assert engine.transport.messages == []
        engine.relay.wake()  # what the notification would have done
        assert len(await engine.published(1)) == 1


async def test_only_a_committed_transaction_wakes_the_relay(pg_url: str) -> None:
    async with relay_on(pg_url) as engine, client_on(pg_url) as client:
        signal = outbox_signal(client.store)
        assert signal is not None
        store = client.store
        assert isinstance(store, SqlSagaStore)

        class RolledBack(Exception):
            pass

        with pytest.raises(RolledBack):
            async with store.transaction() as tx:
                await signal.announce(tx)
                raise RolledBack
        async with store.transaction() as tx:
            await signal.announce(tx)
        await until(lambda: engine.signal.received >= 1)
        await asyncio.sleep(0.5)  # a notification of the rolled-back one would be here
        assert engine.signal.received == 1


async def test_the_listener_reconnects_after_losing_its_connection(pg_url: str) -> None:
    async with relay_on(pg_url, min_backoff=0.05) as engine, client_on(pg_url) as client:
        admin = create_engine(pg_url)
        try:
            killed = await terminate_listeners(admin)
            assert killed == 1
            await until(lambda: not engine.signal.listening)
            await until(lambda: engine.signal.listening)
            await asyncio.sleep(0.2)  # the wake-up of the reconnect has passed
            before = len(engine.transport.messages)
            saga_id = await client.start("place_order", order_input())
            assert (await engine.published(before + 1))[-1].key == saga_id
        finally:
            await admin.dispose()


async def terminate_listeners(database: AsyncEngine) -> int:
    async with database.begin() as conn:
        rows = await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query = :listen"
            ),
            {"listen": f'LISTEN "{CHANNEL}"'},
        )
        return len(rows.all())


def test_only_postgresql_has_a_signal() -> None:
    sqlite = SqlSagaStore(create_engine("sqlite:///:memory:"))
    assert outbox_signal(sqlite) is None


async def test_the_engine_daemon_listens(pg_url: str, tmp_path: Path) -> None:
    """``sagactl engine`` on PostgreSQL keeps a LISTEN connection (the wiring)."""
    cluster = Cluster(pg_url, "memory://", tmp_path)
    cluster.start_engine()
    admin = create_engine(pg_url)
    try:

        async def listening() -> bool:
            cluster.assert_running()
            async with admin.connect() as conn:
                found = await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND query = :listen"
                    ),
                    {"listen": f'LISTEN "{CHANNEL}"'},
                )
            return bool(found)

        assert await wait_until(listening, timeout=30), cluster.logs()
    finally:
        cluster.stop_all()
        await admin.dispose()
