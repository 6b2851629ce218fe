"""Replies set aside because their saga was not visible when they came.

The engine's reply consumer never waits for a saga row: a reply whose saga it cannot
see (another engine's start not committed yet, a saga that never existed or was
pruned) is stored in ``saga_deferred_replies`` in the transaction that applies its
batch (:func:`deferral`), and acknowledged. :class:`DeferredReplyScan` retries the
rows that are due, through the engine's own apply path, until their saga appears or
the patience runs out; then they become dead letters. The consumer, its partition
and every other reply go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from engine._aio import wait_either
from engine.clock import Clock
from engine.deadletters import keep_dead_letter, letter_record
from engine.errors import ConcurrencyConflict, DecodeError
from engine.limits import ANY_SIZE, storable
from engine.messages import Envelope, decode, encode
from engine.replies import Change, ReplyOutcome, ReplyResult
from engine.store.base import DeferredReply, SagaStore, StoreTransaction
from engine.store.failures import error_text, is_transient
from engine.telemetry.logs import saga_context
from engine.transport.base import Message, new_dead_letter_id

log = logging.getLogger("saga.engine")

#: Applies replies inside a transaction: what became of each, and what changed.
Apply = Callable[
    [StoreTransaction, Sequence[Envelope]], Awaitable[tuple[list[ReplyResult], list[Change]]]
]


def deferral(message: Message, reply: Envelope, now: datetime) -> DeferredReply:
    """The row that sets ``reply`` aside, tried again at once by the next scan."""
    return DeferredReply(
        message_id=reply.message_id,
        saga_id=reply.saga_id,
        key=storable(message.key)[:255],
        body=message.body,
        headers={storable(k): storable(v) for k, v in message.headers.items()},
        first_seen_at=now,
        next_attempt_at=now,
    )


def internal(envelope: Envelope, now: datetime) -> DeferredReply:
    """The row that hands a message between a child saga and its parent to the
    engine: applied by the next scan like a reply that came over the broker."""
    return DeferredReply(
        message_id=envelope.message_id,
        saga_id=envelope.saga_id,
        key=envelope.saga_id,
        body=encode(envelope),
        headers={},
        first_seen_at=now,
        next_attempt_at=now,
    )


class DeferredReplyScan:
    """Retries an engine's deferred replies; any number of replicas may run one."""

    def __init__(
        self,
        store: SagaStore,
        apply: Apply,
        committed: Callable[[Sequence[Change]], None],
        *,
        source: str,
        clock: Clock,
        patience: float,
        backoff: float,
        backoff_max: float,
        interval: float,
        batch: int,
        failure_attempts: int,
        failure_backoff: float,
        error_backoff: float,
    ) -> None:
        self.store = store
        self._apply = apply
        self._committed = committed
        #: The replies destination: where a dead-lettered reply is replayed to.
        self.source = source
        self.clock = clock
        #: How long after it came a reply whose saga is still not visible is given up.
        self.patience = patience
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.interval = interval
        self.batch = batch
        self.failure_attempts = failure_attempts
        self.failure_backoff = failure_backoff
        self.error_backoff = error_backoff
        #: Set when a reply was set aside: the scan looks at once.
        self.wake = asyncio.Event()
        #: Deferred replies settled: applied, found duplicate, or dead-lettered.
        self.settled = 0

    async def scan(self) -> int:
        """Retry the deferred replies that are due, in one transaction; how many it took.

        Each goes through the same apply path as a live reply. Applied or duplicate, it
        is deleted; still not visible, it is tried again later (backoff doubling up to
        ``backoff_max``) until ``patience`` after it first came,
        then archived as a dead letter (source: the replies destination, so ``sagactl
        dlq replay`` sends it back there) in the transaction that deletes it. Rows are
        claimed with SKIP LOCKED: replicas share the work. If one row fails the batch
        with an error that is not transient, each is retried on its own, and the
        failing one is dead-lettered after ``failure_attempts``.
        """
        claimed: list[str] = []
        try:
            return await self._scan(self.batch, claimed)
        except ConcurrencyConflict:
            raise
        except Exception as exc:
            if is_transient(exc) or not claimed:
                raise
            if len(claimed) == 1:
                await self._fail(claimed[0], exc)
                return 1
            log.warning(
                "batch of %d deferred replies failed, retrying one by one: %s",
                len(claimed),
                error_text(exc),
            )
        for message_id in claimed:
            try:
                await self._scan(1, [], message_id)
            except ConcurrencyConflict:
                continue  # re-read next scan
            except Exception as exc:
                if is_transient(exc):
                    raise
                await self._fail(message_id, exc)
        return len(claimed)

    async def _scan(self, limit: int, claimed: list[str], message_id: str | None = None) -> int:
        now = self.clock()
        patience = self.patience
        letters: list[tuple[DeferredReply, str]] = []
        async with self.store.transaction() as tx:
            rows = await tx.due_deferred_replies(now, limit, message_id)
            claimed.extend(row.message_id for row in rows)
            if not rows:
                return 0
            replies: list[Envelope] = []
            pending: list[DeferredReply] = []
            for row in rows:
                try:
                    replies.append(decode(row.body, ANY_SIZE))
                    pending.append(row)
                except DecodeError as exc:  # it decoded when it came; a changed engine
                    letters.append((row, str(exc)))
            outcomes, changed = await self._apply(tx, replies)
            done = [row.message_id for row, _ in letters]
            later: list[DeferredReply] = []
            for row, (outcome, _) in zip(pending, outcomes, strict=True):
                # Applied, a duplicate, or kept for an engine that serves its saga: done.
                if outcome is ReplyOutcome.NOT_VISIBLE:
                    if now >= row.first_seen_at + timedelta(seconds=patience):
                        letters.append((row, f"no saga {row.saga_id} after {patience:g}s"))
                    else:
                        later.append(self._later(row, now))
                        continue
                done.append(row.message_id)
            for row, reason in letters:
                await self._dead_letter(tx, row, reason, now)
            await tx.delete_deferred_replies(done)
            await tx.update_deferred_replies(later)
        self._committed(changed)
        self.settled += len(done)
        for row, reason in letters:
            with saga_context(row.saga_id, None):
                log.error("dead-lettering reply %s: %s", row.message_id, reason)
        return len(rows)

    def _later(self, row: DeferredReply, now: datetime) -> DeferredReply:
        """``row`` with its next try: capped doubling, never past its patience."""
        pause = min(
            self.backoff * 2 ** min(row.attempts, 30),
            self.backoff_max,
        )
        last = row.first_seen_at + timedelta(seconds=self.patience)
        return replace(
            row,
            attempts=row.attempts + 1,
            next_attempt_at=min(now + timedelta(seconds=pause), last),
        )

    async def _dead_letter(
        self, tx: StoreTransaction, row: DeferredReply, reason: str, now: datetime
    ) -> None:
        """Archive a deferred reply as a dead letter from the replies destination."""
        message = Message(self.source, row.key, row.body, row.headers)
        record, envelope = letter_record(
            message,
            reason=reason,
            source=self.source,
            letter_id=new_dead_letter_id(),
            received_at=now,
        )
        await keep_dead_letter(tx, record, envelope)

    async def _fail(self, message_id: str, exc: BaseException) -> None:
        """Count a failure of one deferred reply that is not transient; at the bound,
        dead-letter it with the error (or, if the archive refuses it too, drop it with
        an error line: it must not come back forever)."""
        now = self.clock()
        error = error_text(exc)
        async with self.store.transaction() as tx:
            rows = await tx.due_deferred_replies(now, 1, message_id)
            if not rows:
                return  # another replica has it, or it is gone
            (row,) = rows
            failures = row.failures + 1
            if failures < self.failure_attempts:
                log.warning(
                    "deferred reply %s not applied (try %d of %d): %s",
                    message_id,
                    failures,
                    self.failure_attempts,
                    error,
                )
                pause = timedelta(seconds=self.failure_backoff)
                await tx.update_deferred_replies(
                    [
                        replace(
                            row,
                            failures=failures,
                            last_error=storable(error),
                            next_attempt_at=now + pause,
                        )
                    ]
                )
                return
        reason = f"not applied after {failures} attempts: {error}"
        log.error("dead-lettering reply %s: %s", message_id, reason)
        try:
            async with self.store.transaction() as tx:
                if await tx.due_deferred_replies(now, 1, message_id):
                    await self._dead_letter(tx, row, reason, now)
                    await tx.delete_deferred_replies([message_id])
        except Exception as refused:
            if is_transient(refused):
                raise
            log.error(
                "deferred reply %s dropped, the archive refused it too (%s); it was: %r",
                message_id,
                error_text(refused),
                row.body[:200],
            )
            async with self.store.transaction() as tx:
                await tx.delete_deferred_replies([message_id])
        self.settled += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Scan until ``stop``: at once while full batches come back, else every
        ``interval`` or when :attr:`wake` is set."""
        while not stop.is_set():
            try:
                taken = await self.scan()
            except ConcurrencyConflict:
                continue  # a live reply won the race; the row is re-read next round
            except Exception as exc:
                log.error("deferred-reply scan failed, retrying: %s", error_text(exc))
                await wait_either(stop, None, self.error_backoff)
                continue
            if taken < self.batch:
                await wait_either(stop, self.wake, self.interval)
                self.wake.clear()
