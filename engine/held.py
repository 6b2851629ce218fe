"""Held sagas: what no running engine can serve waits, visibly, and resumes by itself.

An engine that meets a saga it does not serve (no definition of its name and version,
or one whose fingerprint is not the one the saga started with: see
:mod:`engine.served`) never advances it. If another live engine serves it, the saga
is left to that one; if none does, the engine *holds* it, in the transaction that met
it (:meth:`~engine.advance.Advancer.replies`, ``timers``, ``undeliverable``): the
saga's ``held`` column says why (``sagactl list``, ``show`` and ``stats`` show it),
its history records it, one log line says it, and its timers pause. Its replies are
kept in ``saga_held_replies`` and acknowledged: never dead-lettered, never applied by
a definition they were not meant for.

:class:`HeldSagaScan` runs in every engine: it resumes the held sagas (and applies the
replies kept for sagas) that this engine serves, once one that serves them runs: the
hold ends, the timers move on by the time it lasted, and the kept replies go through
the engine's one apply path in the order they came. Its loop also beats the engine's
:class:`~engine.served.Registration`.
"""

from __future__ import annotations

import asyncio
import logging

from engine._aio import wait_either
from engine.advance import Advancer
from engine.clock import Clock, utc_now
from engine.errors import ConcurrencyConflict, DecodeError
from engine.limits import ANY_SIZE
from engine.messages import Envelope, decode
from engine.model import HistoryEntry
from engine.replies import ReplyOutcome
from engine.served import Registration, definitions_of
from engine.store.base import SagaStore
from engine.store.failures import error_text
from engine.telemetry.logs import saga_context

log = logging.getLogger("saga.engine")


class HeldSagaScan:
    """Resumes the held sagas this engine serves; any number of replicas may run one
    (the sagas are claimed with SKIP LOCKED)."""

    def __init__(
        self,
        store: SagaStore,
        advancer: Advancer,
        *,
        clock: Clock,
        interval: float,
        batch: int,
        error_backoff: float,
        registration: Registration | None = None,
    ) -> None:
        self.store = store
        self.advancer = advancer
        self.clock = clock
        #: Pause when nothing was resumable (the scan is woken at once when this engine
        #: kept a reply for a saga it serves).
        self.interval = interval
        self.batch = batch
        self.error_backoff = error_backoff
        #: Beaten every round; None: this engine does not register (tests).
        self.registration = registration
        #: Sagas resumed, and kept replies re-applied, by this scan.
        self.resumed = 0
        self.reapplied = 0

    async def scan(self) -> int:
        """Resume up to a batch of sagas in one transaction; how many it took."""
        now = self.clock()
        resumed: dict[str, float] = {}
        async with self.store.transaction() as tx:
            ids = await tx.resumable_sagas(definitions_of(self.advancer.registry), self.batch)
            if not ids:
                return 0
            since = await tx.release_sagas(ids, now)
            kept = await tx.kept_replies(ids)
            replies: list[Envelope] = []
            for row in kept:
                try:
                    replies.append(decode(row.body, ANY_SIZE))
                except DecodeError as exc:  # it was encoded by an engine: a changed one
                    with saga_context(row.saga_id, None):
                        log.error("dropping kept reply %s: %s", row.message_id, exc)
            counts = {saga_id: 0 for saga_id in since}
            for reply in replies:
                if reply.saga_id in counts:
                    counts[reply.saga_id] += 1
            entries = []
            for saga_id, held_at in since.items():
                seconds = max(0.0, (now - held_at).total_seconds())
                resumed[saga_id] = seconds
                detail = (
                    f"an engine that serves it runs ({self._engine()}): held {seconds:.1f}s, "
                    f"its timers moved on as much; {counts[saga_id]} kept repl"
                    f"{'y' if counts[saga_id] == 1 else 'ies'} applied"
                )
                entries.append((saga_id, HistoryEntry(now, "resumed", None, detail)))
            await tx.add_histories(entries)
            outcomes, changed = await self.advancer.replies(tx, replies)
            # One kept again (HELD: not served after all) stays; the others are done.
            done = {
                reply.message_id
                for reply, (outcome, _) in zip(replies, outcomes, strict=True)
                if outcome is not ReplyOutcome.HELD
            }
            bad = {row.message_id for row in kept} - {r.message_id for r in replies}
            await tx.delete_kept_replies(sorted(done | bad))
        self.advancer.committed(changed)
        self.resumed += len(resumed)
        self.reapplied += len(done)
        for saga_id, seconds in resumed.items():
            with saga_context(saga_id, None):
                log.info("resumed saga %s, held %.1fs", saga_id, seconds)
        return len(ids)

    def _engine(self) -> str:
        registration = self.registration
        return f"engine {registration.engine_id}" if registration is not None else "this engine"

    async def run(self, stop: asyncio.Event) -> None:
        """Beat the registration and scan until ``stop``: at once again after a full
        batch, else after ``interval`` or when a reply was kept for a saga this engine
        serves. Once stopped, the registration is withdrawn."""
        wake = self.advancer.kept
        while not stop.is_set():
            try:
                if self.registration is not None:
                    # Wall-clock time, whatever this engine's clock: other processes
                    # read the registration against theirs.
                    await self.registration.beat(utc_now())
                taken = await self.scan()
            except ConcurrencyConflict:
                continue
            except Exception as exc:
                log.error("held-saga scan failed, retrying: %s", error_text(exc))
                await wait_either(stop, None, self.error_backoff)
                continue
            if taken < self.batch:
                await wait_either(stop, wake, self.interval)
                wake.clear()
        if self.registration is not None:
            try:
                await self.registration.leave()
            except Exception as exc:  # it expires by itself
                log.warning("could not withdraw the engine's registration: %s", error_text(exc))
