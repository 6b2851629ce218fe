"""The timer scanner: fires the step timeouts and retry backoffs that fell due.

A small seam of the engine: :class:`TimerScanner` is what the engine calls, one scan
at a time; :class:`StoreTimerScanner` is the one backed by the saga store, which
claims due timers and advances their sagas through the engine's
:class:`~engine.advance.Advancer` (its TimerDue path) in one transaction.
:func:`scan_timers` paces any scan: at once again after a full batch, else after
the interval; after an error, a pause.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

from engine._aio import wait_either
from engine.advance import Advancer
from engine.errors import ConcurrencyConflict
from engine.store.base import SagaStore

log = logging.getLogger("saga.engine")


class TimerScanner(Protocol):
    """Fires due timers; any number of engine replicas may scan at once."""

    #: Most timers one scan fires: a full batch means more may be due.
    batch: int

    async def fire_due(self, now: datetime, *, timeouts_due_by: datetime | None) -> int:
        """Fire the timers due at ``now``; how many fired.

        A step or compensation timeout counts as due only if it fell due by
        ``timeouts_due_by`` (the reply watermark's bound; None: by its deadline), so
        it never overtakes a reply waiting unapplied in the broker."""
        ...


class StoreTimerScanner:
    """Claims due timers from the store (locked, skipped by other replicas) and
    advances their sagas, all in one transaction."""

    def __init__(self, store: SagaStore, advancer: Advancer, *, batch: int = 100) -> None:
        if batch < 1:
            raise ValueError("a timer batch is at least 1")
        self.store = store
        self.advancer = advancer
        self.batch = batch

    async def fire_due(self, now: datetime, *, timeouts_due_by: datetime | None) -> int:
        """See :meth:`TimerScanner.fire_due`; the relay is woken once it committed."""
        async with self.store.transaction() as tx:
            fired, changed = await self.advancer.timers(
                tx, now, self.batch, timeouts_due_by=timeouts_due_by
            )
        self.advancer.committed(changed)
        return fired


async def scan_timers(
    scan: Callable[[], Awaitable[int]],
    stop: asyncio.Event,
    *,
    batch: int,
    interval: float,
    error_backoff: float,
) -> None:
    """Call ``scan`` until ``stop``: again at once after a full ``batch`` (more are
    due), else after ``interval``; after an error, after ``error_backoff``."""
    while not stop.is_set():
        try:
            fired = await scan()
        except ConcurrencyConflict:
            continue  # a reply won the race; the timer is re-read next round
        except Exception as exc:
            log.error("timer scan failed, retrying: %s", exc)
            await wait_either(stop, None, error_backoff)
            continue
        if fired < batch:
            await wait_either(stop, None, interval)
