"""Bounded database growth: scheduled pruning of rows whose job is done.

Every table that only grows gets a rule: how long its rows are kept, and a function
that deletes one batch of older rows in its own short transaction. A :class:`Pruner`
applies its rules on a schedule, batch after batch until a batch comes back short, so
it never holds locks for long. Several replicas may prune at once: the deletes pick
their rows with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas take disjoint
rows and never wait on each other (SQLite serialises writers anyway), and deleting a
row that is already gone is a no-op.

What the engine daemon prunes, and why it is safe:

* **Sent outbox rows** (default after 1 hour). Once the broker confirmed a message,
  nothing reads its row again; unsent rows are never pruned, however old.
* **Inbox rows** (default after 7 days): the ids of replies the engine applied. The
  inbox recognises a redelivered reply before anything else looks at it, so a row must
  outlive every way a reply can come back: a redelivery after a crash (seconds), a
  Kafka consumer group that lost its offsets and re-reads the topic from the earliest
  message it still retains (Kafka keeps 7 days by default), a dead letter replayed by
  hand. A duplicate that arrives after its row was pruned is still harmless, because
  the saga no longer waits for its attempt token: it is recorded as ``reply_ignored``
  and changes nothing (or, if its saga was pruned too, dead-lettered as a reply for no
  saga). The retention bounds that noise; it is not what keeps replies applied once.

The worker daemon prunes the participant barrier (see
:func:`engine.worker.barrier.prune`), whose retention is the one that guarantees
rest on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from engine.clock import Clock, utc_now

if TYPE_CHECKING:
    import asyncio

# asyncio is imported in the pruner's methods: ``sagactl --help`` reads the age syntax
# and PRUNE_BATCH from here, and starts faster without it (tests/test_cli_imports.py).

log = logging.getLogger("saga.retention")

#: Finished sagas removed per transaction by ``SagaClient.prune`` (each takes its
#: steps, history and messages along: some tens of rows).
PRUNE_BATCH = 500

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_age(text: str, *, bare_seconds: bool = False) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s`` or ``2w`` as a timedelta.

    With ``bare_seconds`` a plain number counts as seconds (environment variables);
    the CLI insists on a unit, so a forgotten ``d`` cannot prune a month's sagas.
    Raises ValueError with a message fit for the user.
    """
    value = text.strip().lower()
    if bare_seconds and re.fullmatch(r"\d+(?:\.\d+)?", value):
        return timedelta(seconds=float(value))
    match = _AGE.fullmatch(value)
    if match is None:
        raise ValueError(f"not an age: {text!r} (use e.g. 30d, 12h, 90m or 3600s)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def format_age(age: timedelta) -> str:
    """An exact spelling :func:`parse_age` reads back, in days at most (``7d``, ``90m``)."""
    seconds = age.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


#: Deletes up to ``limit`` rows older than the instant given; returns how many.
PruneBatch = Callable[[datetime, int], Awaitable[int]]


@dataclass(frozen=True)
class PruneRule:
    """Rows of ``table`` older than ``keep`` go, ``prune`` deleting one batch."""

    table: str
    keep: timedelta
    prune: PruneBatch


class Pruner:
    """Applies retention rules every ``interval`` seconds, in batches of ``batch``."""

    def __init__(
        self,
        rules: Sequence[PruneRule],
        *,
        interval: float = 60.0,
        batch: int = 5000,
        clock: Clock = utc_now,
    ) -> None:
        self.rules = list(rules)
        self.interval = interval
        self.batch = batch
        self.clock = clock
        #: Rows removed per table since this pruner was made.
        self.pruned: dict[str, int] = dict.fromkeys((r.table for r in self.rules), 0)

    def describe(self) -> str:
        rules = ", ".join(f"{r.table} after {format_age(r.keep)}" for r in self.rules)
        return f"pruning {rules}, every {self.interval:g}s in batches of {self.batch}"

    async def prune_once(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """One round: each rule, batch after batch until one comes back short (or
        ``stop`` is set). Returns the rows removed per table."""
        import asyncio

        now = self.clock()
        removed: dict[str, int] = {}
        for rule in self.rules:
            before = now - rule.keep
            total = 0
            while stop is None or not stop.is_set():
                count = await rule.prune(before, self.batch)
                total += count
                if count < self.batch:
                    break
                await asyncio.sleep(0)  # let the daemon's other loops in between batches
            removed[rule.table] = total
            self.pruned[rule.table] += total
        return removed

    async def run(self, stop: asyncio.Event) -> None:
        """Prune now and then every ``interval`` until ``stop``; a failed round (the
        database is down) is logged and tried again at the next one."""
        from engine._aio import wait_either

        while not stop.is_set():
            try:
                removed = await self.prune_once(stop)
            except Exception as exc:
                log.warning("pruning failed, trying again in %gs: %s", self.interval, exc)
            else:
                if any(removed.values()):
                    done = ", ".join(f"{n} {table}" for table, n in removed.items() if n)
                    log.info("pruned %s", done)
            await wait_either(stop, None, self.interval)
