"""The reply watermark: evidence that no reply waits unapplied, for the timeout rule.

A step timeout means "no answer came", not "the clock ran out while nobody was
listening". So the engine keeps a horizon H: a time such that every reply that was in
the broker for its reply subscription at H has been applied (acked or dead-lettered
after its transaction committed). A timeout due at ``due_at`` fires only once
``due_at <= H``, or, so that a consumer that never catches up cannot stop timeouts for
ever, once it is ``hold`` overdue (:meth:`ReplyWatermark.timeouts_due_by`).

H moves by marks: every ``interval`` the watermark takes a mark of the subscription at
time t (a position past everything the broker holds), and when the subscription has
settled past it, H becomes t. After an interruption, marks count only from a while
after it: ``settle`` after the engine starts; after the broker was unreachable (marks
failed, or a new broker channel), as long again as the outage lasted, and at least
``settle``. Meanwhile workers come back: a reply that could not be published during
the outage is published within the worker's capped backoff, a command the outage held
up is consumed and answered, and the mark must be taken after that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime, timedelta

from engine._aio import wait_either
from engine.clock import Clock
from engine.errors import TransportError
from engine.transport.base import Mark, Subscription

log = logging.getLogger("saga.engine.watermark")

#: Marks waiting to be settled past; while full, new ones are not kept (H still moves
#: as the old ones settle). Marks older than the hold bound are let go.
MAX_PENDING_MARKS = 16


class ReplyWatermark:
    """Samples a reply subscription's marks and keeps the horizon H in memory."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        clock: Clock,
        interval: float,
        settle: timedelta,
        hold: timedelta,
    ) -> None:
        self.subscription = subscription
        self.clock = clock
        self.interval = interval
        self.settle = settle
        self.hold = hold
        #: None until the first mark was settled past.
        self.horizon: datetime | None = None
        self._pending: deque[tuple[datetime, Mark]] = deque()
        self._epoch: int | None = None
        #: From when marks count again after the last interruption; None while
        #: interrupted. Starting is an interruption.
        self._counts_from: datetime | None = None
        #: The last mark taken before the broker became unreachable.
        self._last_mark: datetime | None = None
        self._down_since: datetime | None = None
        #: Whether H moved since the last interruption (logged once each time).
        self._caught_up = False

    def timeouts_due_by(self, now: datetime) -> datetime:
        """Timeouts due at or before this may fire now: those the evidence covers, and
        those overdue by the hold bound whatever the evidence."""
        bound = now - self.hold
        if self.horizon is not None and self.horizon > bound:
            bound = self.horizon
        return min(now, bound)

    async def sample(self) -> None:
        """Take a mark, and move H to the newest mark the subscription settled past."""
        taken = self.clock()
        try:
            mark = await self.subscription.mark()
        except TransportError as exc:
            if self._counts_from is not None:
                log.warning("reply watermark frozen at %s: %s", self.horizon, exc)
            self._interrupted()
            return
        if self._counts_from is None or mark.epoch != self._epoch:
            self._interrupted()
            self._epoch = mark.epoch
            # Back after an outage: the workers' consumers come back too, and answer
            # the commands the outage held up; the longer it was, the longer that
            # takes (a Kafka broker leads its partitions again, groups rejoin). So
            # marks count again only after as long again, and at least the settle.
            down = taken - self._down_since if self._down_since is not None else timedelta(0)
            self._counts_from = taken + max(self.settle, down)
            self._down_since = None
        self._last_mark = taken
        if taken >= self._counts_from and len(self._pending) < MAX_PENDING_MARKS:
            self._pending.append((taken, mark))
        await self._advance(taken)

    async def _advance(self, now: datetime) -> None:
        # A mark the hold bound has overtaken proves nothing the bound does not.
        while self._pending and self._pending[0][0] < now - self.hold:
            self._pending.popleft()
        if not self._pending:
            return
        # Caught up: the newest mark is settled past, and with it every older one (an
        # older one may never be: a RabbitMQ marker dropped after a nack).
        at, mark = self._pending[-1]
        if await self.subscription.settled_past(mark):
            self._pending.clear()
            self._move_to(at)
            return
        # Behind: H follows the oldest marks as the backlog drains.
        while len(self._pending) > 1:
            at, mark = self._pending[0]
            if not await self.subscription.settled_past(mark):
                return
            self._pending.popleft()
            self._move_to(at)

    def _move_to(self, at: datetime) -> None:
        if self.horizon is None or at > self.horizon:
            self.horizon = at
        if not self._caught_up:
            self._caught_up = True
            log.info("reply consumer caught up with the broker as of %s", at.isoformat())

    def _interrupted(self) -> None:
        self._caught_up = False
        self._pending.clear()
        self._epoch = None
        self._counts_from = None
        if self._down_since is None:
            self._down_since = self._last_mark

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``interval`` until ``stop``."""
        while not stop.is_set():
            try:
                await self.sample()
            except Exception:
                log.exception("reply watermark sample failed")
                self._interrupted()
            await wait_either(stop, None, self.interval)
