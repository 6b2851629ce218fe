"""The engine's reply consumer: applies replies in batches and settles their deliveries.

A batch of deliveries is decoded (a message it cannot take is dead-lettered at once),
applied in one transaction through the engine's :class:`~engine.advance.Advancer`,
and each delivery is then settled by its outcome, a value (:data:`Settlement`): ack
only after the commit, hand back for redelivery, or dead-letter with a reason. A
batch that fails is applied reply by reply, each with its own retries: conflicts
again at once, a transient database error handed back (with a pause), any other
error a bounded number of times before its reply is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from engine._aio import batched, wait_either
from engine.advance import Advancer
from engine.clock import Clock
from engine.deferred import DeferredReplyScan, deferral
from engine.errors import ConcurrencyConflict, DecodeError, SagaError
from engine.faults import crashpoint
from engine.limits import Limits
from engine.messages import Envelope, MessageKind, decode
from engine.replies import ReplyOutcome, ReplyResult
from engine.signing import Signing
from engine.store.base import SagaStore
from engine.store.failures import error_text, is_transient
from engine.telemetry.logs import saga_context
from engine.transport.base import Delivery, Message, Subscription

log = logging.getLogger("saga.engine")


class NotVisible(Exception):
    """The reply's saga row is not (yet) visible to this transaction."""


@dataclass(frozen=True)
class Failed:
    """A reply transaction that failed: retried, handed back or dead-lettered by the
    error's kind."""

    error: Exception


@dataclass(frozen=True)
class Ack:
    """The reply's transaction committed (or it needed none): done with it."""


@dataclass(frozen=True)
class Nack:
    """Hand the delivery back for redelivery; ``pause`` first when the database is away."""

    pause: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """Move the delivery to the dead-letter destination, saying why."""

    reason: str


#: How a delivery is settled.
Settlement = Ack | Nack | DeadLetter
ACK = Ack()


def _log_duplicate(reply: Envelope) -> None:
    with saga_context(reply.saga_id, reply.step):
        log.info(
            "reply %s of saga %s was applied before: a duplicate, acknowledged",
            reply.message_id,
            reply.saga_id,
        )


class ReplyConsumer:
    """Applies the replies of the engine's subscription and settles each delivery."""

    def __init__(
        self,
        store: SagaStore,
        advancer: Advancer,
        deferred: DeferredReplyScan,
        *,
        stop: asyncio.Event,
        clock: Clock,
        signing: Signing,
        limits: Limits,
        batch: int,
        unknown_saga_patience: float,
        conflict_retries: int,
        failure_attempts: int,
        failure_backoff: float,
        error_backoff: float,
    ) -> None:
        self.store = store
        self.advancer = advancer
        #: Where replies whose saga is not visible go; woken when some were set aside.
        self.deferred = deferred
        #: The engine's stop: pauses end early when it is set.
        self.stop = stop
        self.clock = clock
        #: Checks every reply before it is decoded.
        self.signing = signing
        self.limits = limits
        #: Most replies applied in one transaction.
        self.batch = batch
        self.unknown_saga_patience = unknown_saga_patience
        self.conflict_retries = conflict_retries
        self.failure_attempts = failure_attempts
        self.failure_backoff = failure_backoff
        self.error_backoff = error_backoff
        #: Deliveries acknowledged (applied, duplicate or deferred).
        self.handled = 0

    async def consume(self, subscription: Subscription) -> None:
        """Apply the subscription's replies until it is closed.

        Replies that arrived while the last batch was being applied are applied
        together, in one transaction: under load the database sees a few statements
        per batch instead of a dozen per reply; idle, a batch is one."""
        async for batch in batched(subscription, self.batch):
            await self.handle_deliveries(batch)

    async def handle_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Apply a batch of deliveries, then settle each (ack after the commit).

        Nothing here waits for anything but the database: a reply whose saga is not
        visible is set aside in the same transaction (see :mod:`engine.deferred`).
        """
        decoded: list[tuple[Delivery, Envelope]] = []
        for delivery in deliveries:
            try:
                self.signing.check(delivery.message, "reply")
                envelope = decode(delivery.message.body, self.limits)
                if envelope.kind is not MessageKind.REPLY:
                    raise DecodeError(f"the engine takes replies, not a {envelope.kind}")
            except DecodeError as exc:  # a SignatureError too: refused, never applied
                log.error("dead-lettering a message it cannot take: %s", exc)
                await self._settle(delivery, DeadLetter(str(exc)))
                continue
            decoded.append((delivery, envelope))
        if len(decoded) > 1:
            attempt = await self._attempt(
                [envelope for _, envelope in decoded],
                [delivery.message for delivery, _ in decoded],
            )
            if isinstance(attempt, Failed):
                # A conflict, the database, or one bad reply failed the batch: each on
                # its own now, with the retries and back-off of the single path.
                log.warning(
                    "batch of %d replies failed, applying one by one: %s",
                    len(decoded),
                    error_text(attempt.error),
                )
            else:
                for (delivery, envelope), result in zip(decoded, attempt, strict=True):
                    with saga_context(envelope.saga_id, envelope.step):
                        await self._settle(delivery, self._settlement(envelope, result))
                return
        for delivery, envelope in decoded:
            with saga_context(envelope.saga_id, envelope.step):
                await self._settle(delivery, await self._apply_one(delivery, envelope))

    async def _attempt(
        self, replies: Sequence[Envelope], deliveries: Sequence[Message]
    ) -> list[ReplyResult] | Failed:
        """Apply replies in one transaction: what became of each, or why it failed."""
        try:
            return await self.apply_replies(replies, deliveries=deliveries)
        except Exception as exc:
            return Failed(exc)

    async def _settle(self, delivery: Delivery, settlement: Settlement) -> None:
        """Settle a delivery as decided (an ack only after its reply's commit)."""
        try:
            if isinstance(settlement, DeadLetter):
                await delivery.dead_letter(settlement.reason)
            elif isinstance(settlement, Nack):
                await delivery.nack()
                if settlement.pause:
                    await wait_either(self.stop, None, self.error_backoff)
            else:
                crashpoint("engine.after_commit")
                self.handled += 1
                await delivery.ack()
        except SagaError as exc:
            # e.g. the dead-letter destination refused: the message was handed
            # back to the broker, so pause instead of ending the consumer.
            log.error("delivery not settled, broker will redeliver: %s", exc)
            await wait_either(self.stop, None, self.error_backoff)

    def _settlement(self, envelope: Envelope, result: ReplyResult) -> Settlement:
        """How to settle a delivery whose reply's transaction committed, by its outcome."""
        outcome, _ = result
        if outcome is ReplyOutcome.DUPLICATE:
            _log_duplicate(envelope)
        elif outcome is ReplyOutcome.DEFERRED:
            log.warning(
                "reply %s: saga %s is not visible (yet); set aside, retried for up to %gs",
                envelope.message_id,
                envelope.saga_id,
                self.unknown_saga_patience,
            )
        return ACK

    async def _apply_one(self, delivery: Delivery, envelope: Envelope) -> Settlement:
        """Apply one reply, retrying conflicts and (a bounded number of times) errors
        that are not transient; how to settle its delivery."""
        conflicts = 0
        failures = 0
        while True:
            attempt = await self._attempt([envelope], [delivery.message])
            if not isinstance(attempt, Failed):
                (result,) = attempt
                return self._settlement(envelope, result)
            exc = attempt.error
            if isinstance(exc, ConcurrencyConflict):
                conflicts += 1
                if conflicts > self.conflict_retries:
                    return Nack()
                continue
            if is_transient(exc):
                # The database is away or busy: everyone's problem, nobody's dead
                # letter. The broker redelivers; back off so it is not a hot loop.
                log.error(
                    "reply %s not applied, will be redelivered: %s",
                    envelope.message_id,
                    error_text(exc),
                )
                return Nack(pause=True)
            failures += 1
            if failures >= self.failure_attempts:
                reason = f"not applied after {failures} attempts: {error_text(exc)}"
                log.error("dead-lettering reply %s: %s", envelope.message_id, reason, exc_info=exc)
                return DeadLetter(reason)
            log.warning(
                "reply %s not applied (try %d of %d): %s",
                envelope.message_id,
                failures,
                self.failure_attempts,
                error_text(exc),
            )
            await wait_either(self.stop, None, self.failure_backoff)

    async def handle_reply(self, reply: Envelope) -> bool:
        """Apply one reply in one transaction; False if it was not applied now: a
        duplicate, or kept for an engine that serves its saga (see engine/held.py)."""
        ((outcome, _),) = await self.apply_replies([reply])
        if outcome is ReplyOutcome.NOT_VISIBLE:
            raise NotVisible(reply.saga_id)
        return outcome is ReplyOutcome.APPLIED

    async def apply_replies(
        self, replies: Sequence[Envelope], *, deliveries: Sequence[Message] | None = None
    ) -> list[ReplyResult]:
        """Apply replies in one transaction, in order; what became of each.

        With ``deliveries`` (the messages the replies came in, in the same order), the
        replies whose saga is not visible are set aside in the same transaction, in
        one statement, and come back DEFERRED: the caller acknowledges them at once.
        """
        async with self.store.transaction() as tx:
            outcomes, changed = await self.advancer.replies(tx, replies)
            if deliveries is not None:
                unseen = [
                    i
                    for i, (outcome, _) in enumerate(outcomes)
                    if outcome is ReplyOutcome.NOT_VISIBLE
                ]
                now = self.clock()
                await tx.defer_replies([deferral(deliveries[i], replies[i], now) for i in unseen])
                for i in unseen:
                    outcomes[i] = ReplyResult(ReplyOutcome.DEFERRED)
        self.advancer.committed(changed)
        if any(outcome is ReplyOutcome.DEFERRED for outcome, _ in outcomes):
            self.deferred.wake.set()
        return outcomes
