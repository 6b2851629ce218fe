"""The PostgreSQL connection pool: a connection the server closed never reaches a
transaction (checked for free on checkout, instead of a ping round trip per checkout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from engine.database import create_engine
from tests.e2e import fresh_database, service_url

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        yield url


async def test_a_pooled_connection_the_server_closed_is_replaced_not_used(pg_url: str) -> None:
    """Without a ping per checkout, a connection whose backend is gone must still never
    reach a transaction: the next one gets a fresh connection and succeeds."""
    database = create_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        async with database.begin() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        admin = create_engine(pg_url)
        try:
            async with admin.begin() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await admin.dispose()
        await asyncio.sleep(0.2)  # the server's goodbye reaches the idle connection
        async with database.begin() as conn:
            again = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert again != pid
    finally:
        await database.dispose()
