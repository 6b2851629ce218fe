"""PostgreSQL's side of the outbox signal: ``NOTIFY`` in the writing transaction,
``LISTEN`` on a dedicated connection in the relay's process.

PostgreSQL delivers a notification only when the transaction that issued it commits,
so a relay woken by one always finds the rows committed; a rolled-back transaction
wakes nobody. Notifications carry no payload: the relay claims whatever is unsent,
exactly as when it polls (it keeps polling, so a lost notification only costs the
poll interval).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from engine._aio import wait_either
from engine.database import connect_postgres
from engine.store.base import OutboxSignal, SagaStore, StoreTransaction

log = logging.getLogger("saga.store.postgres")

#: The notification channel (per database, as LISTEN / NOTIFY are).
CHANNEL = "saga_outbox"


class PgOutboxSignal:
    """The :class:`~engine.store.base.OutboxSignal` of a PostgreSQL database."""

    def __init__(
        self,
        database: AsyncEngine,
        *,
        channel: str = CHANNEL,
        connect_timeout: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 5.0,
        check_interval: float = 5.0,
    ) -> None:
        self.database = database
        self.channel = channel
        self.connect_timeout = connect_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        #: How often an idle listening connection is checked for being closed.
        self.check_interval = check_interval
        #: True while a LISTEN connection is up (tests and health checks read it).
        self.listening = False
        #: Notifications received (tests read it).
        self.received = 0

    async def announce(self, tx: StoreTransaction) -> None:
        conn = getattr(tx, "conn", None)  # the SQL store's transaction has its connection
        if not isinstance(conn, AsyncConnection):
            raise TypeError(f"PgOutboxSignal announces in SQL transactions, not {tx!r}")
        await conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": self.channel})

    async def _connect(self) -> Any:
        """A connection of its own, made as the engine's pool makes them (TLS and all);
        the URL's ``connect_timeout`` wins over ours."""
        return await connect_postgres(self.database.url, default_timeout=self.connect_timeout)

    async def listen(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        backoff = self.min_backoff
        while not stop.is_set():
            try:
                conn = await self._connect()
            except Exception as exc:  # database down or unreachable: poll meanwhile
                log.warning(
                    "cannot LISTEN for new outbox rows (%s); polling, retrying in %gs",
                    exc or type(exc).__name__,
                    backoff,
                )
                await wait_either(stop, None, backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            lost = asyncio.Event()

            def on_notify(*_: Any) -> None:
                self.received += 1
                wake()

            def on_lost(_conn: Any, lost: asyncio.Event = lost) -> None:
                lost.set()

            try:
                conn.add_termination_listener(on_lost)
                await conn.add_listener(self.channel, on_notify)
                self.listening = True
                backoff = self.min_backoff
                wake()  # rows announced while nobody listened
                while not stop.is_set() and not lost.is_set() and not conn.is_closed():
                    await wait_either(stop, lost, self.check_interval)
                if not stop.is_set():
                    log.warning("LISTEN connection for new outbox rows lost; reconnecting")
            except Exception as exc:
                log.warning("LISTEN for new outbox rows failed (%s); reconnecting", exc)
            finally:
                self.listening = False
                await _close(conn)
            await wait_either(stop, None, backoff)
            backoff = min(self.max_backoff, backoff * 2)


async def _close(conn: Any) -> None:
    if conn.is_closed():
        return
    try:
        async with asyncio.timeout(2.0):
            await conn.close()
    except Exception:
        conn.terminate()


def outbox_signal(store: SagaStore) -> OutboxSignal | None:
    """The cross-process outbox signal of ``store``'s database, if it has one."""
    return store.outbox_signal()


__all__ = ["CHANNEL", "PgOutboxSignal", "outbox_signal"]
