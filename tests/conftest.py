from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.database import create_engine, upgrade
from engine.store.sql import SqlSagaStore
from tests.brokers import drop_queued
from tests.e2e import fresh_database, service_url
from tests.helpers import EmbeddedSystem
from tests.services import BROKERS
from workers import ledger
from workers.demo import SAGAS, WORKERS

# The example, configured as a checkout's user configures it (README): the library
# itself names no saga module and no worker.
os.environ.setdefault("SAGA_SAGAS", ",".join(SAGAS))
os.environ.setdefault("SAGA_WORKERS", ",".join(WORKERS))


@pytest.fixture(autouse=True)
def _drop_broker_objects() -> Iterator[None]:
    """Drop the Kafka topics and RabbitMQ queues the test created (tests/brokers.py).

    Autouse, so set up first and torn down last: after the test's own fixtures closed
    their transports and daemons, none of which could re-create a dropped topic.
    """
    yield
    drop_queued()


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each real broker's URL in turn (a test using it runs once per broker)."""
    return service_url(BROKERS[request.param])


@pytest.fixture
def postgres_url() -> str:
    """The real PostgreSQL server's URL (tests make their own databases on it)."""
    return service_url("SAGA_TEST_POSTGRES_URL")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A temp SQLite database migrated to head: the engine's and the example's histories."""
    engine = create_engine(f"sqlite:///{tmp_path / 'saga.db'}")
    await upgrade(engine, scripts=[ledger.MIGRATIONS])
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def store(db: AsyncEngine) -> SqlSagaStore:
    return SqlSagaStore(db)


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[EmbeddedSystem]:
    """Engine and the three example workers running on SQLite + MemoryBroker."""
    async with EmbeddedSystem(tmp_path / "system.db") as running:
        yield running


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlSagaStore]:
    """A migrated store on SQLite, then on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        db = create_engine(f"sqlite:///{tmp_path / 'any.db'}")
        await upgrade(db)
        try:
            yield SqlSagaStore(db)
        finally:
            await db.dispose()
        return
    async with pg_database() as store:
        yield store


@pytest.fixture
async def pg_store() -> AsyncIterator[SqlSagaStore]:
    """A migrated store on a fresh PostgreSQL database."""
    async with pg_database() as store:
        yield store


@asynccontextmanager
async def pg_database() -> AsyncIterator[SqlSagaStore]:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        db = create_engine(url)
        try:
            yield SqlSagaStore(db)
        finally:
            await db.dispose()
