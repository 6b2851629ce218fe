"""PostgreSQL helpers shared by the tests and the benchmark (no pytest here)."""

from __future__ import annotations

import asyncio
import time

import asyncpg


async def drop_database(admin: asyncpg.Connection, name: str, patience: float = 30.0) -> None:
    """DROP ... WITH (FORCE), retried while it may not end a backend: an autovacuum
    worker busy in a freshly written database belongs to the superuser, and FORCE run
    by an ordinary role fails on it until it is done."""
    deadline = time.monotonic() + patience
    while True:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except asyncpg.InsufficientPrivilegeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
