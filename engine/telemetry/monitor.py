"""The daemons' periodic look at their dependencies: readiness and gauge values.

Runs on the event loop (it needs the async database); the HTTP thread only reads
what it leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from engine._aio import wait_either
from engine.store.queries import SagaQueries
from engine.telemetry import metrics
from engine.telemetry.http import Readiness

log = logging.getLogger("saga.monitor")


async def watch(
    readiness: Readiness,
    stop: asyncio.Event,
    *,
    ping: Callable[[], Awaitable[None]],
    consuming: Callable[[], bool],
    broker: Callable[[], bool] = lambda: True,
    store: SagaQueries | None = None,
    interval: float = 2.0,
) -> None:
    """Refresh readiness (database, consumer) and, for the engine, the saga gauges."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(ping(), timeout=interval * 2)
            if store is not None:
                stats = await store.stats()
                metrics.update_sagas({(c.name, c.status.value): c.count for c in stats.counts})
                metrics.snapshot.outbox_backlog = stats.outbox_unsent
                metrics.update_held({(h.name, str(h.version)): h.count for h in stats.held})
            readiness.set("database", True)
        except Exception as exc:
            readiness.set("database", False, f"{type(exc).__name__}: {exc}")
            log.warning("database check failed: %s", exc)
        attached = consuming()
        readiness.set("consumer", attached, "" if attached else "not consuming")
        reachable = broker()
        readiness.set("broker", reachable, "" if reachable else "last publish failed")
        await wait_either(stop, None, interval)
