"""Alembic environment.

``engine.database.upgrade`` hands in a live connection (so migrations run inside the
caller's event loop); the ``alembic`` command line falls back to ``SAGA_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from engine.store.schema import metadata

config = context.config


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    from engine.database import create_engine

    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(run_with)
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "SAGA_DATABASE_URL", "sqlite:///saga.db"
    )
    asyncio.run(run_from_url(url))
