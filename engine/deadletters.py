"""The dead-letter archive.

The engine consumes the dead-letter destination and keeps every message that reached
it in ``saga_dead_letters``: source destination, reason, key, body and headers. A dead
letter whose body names a saga is also recorded in that saga's history. So nothing a
consumer gave up on is lost, and ``sagactl dlq`` can list it and send it back to where
it came from (through the outbox, so the replay is transactional too).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from engine._aio import wait_either
from engine.clock import Clock, utc_now
from engine.errors import DecodeError, SagaError
from engine.limits import ANY_SIZE
from engine.messages import Envelope, decode
from engine.model import HistoryEntry
from engine.store.base import DeadLetterRecord, SagaStore, StoreTransaction
from engine.transport.base import (
    DEAD_LETTER_ID,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    Delivery,
    Message,
    Subscription,
    new_dead_letter_id,
)

log = logging.getLogger("saga.deadletters")

#: Headers RabbitMQ sets when the broker itself dead-letters (expired, rejected, ...).
_BROKER_REASON = "x-first-death-reason"
_BROKER_SOURCE = "x-first-death-queue"

#: Headers that describe a dead-lettering; a replay sends the message without them.
_DEATH_PREFIXES = ("x-dead-letter-", "x-death", "x-first-death-", "x-last-death-")


def replay_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers a replayed message is sent with: its own, minus the dead-lettering."""
    return {k: v for k, v in headers.items() if not k.lower().startswith(_DEATH_PREFIXES)}


def describe(envelope: Envelope) -> str:
    return f"{envelope.kind} {envelope.name} (attempt {envelope.attempt})"


class DeadLetterArchive:
    def __init__(self, store: SagaStore, *, clock: Clock = utc_now) -> None:
        self.store = store
        self.clock = clock
        self.archived = 0

    async def archive(self, message: Message) -> int | None:
        """Keep one dead letter; returns its archive id, or None if it was kept before
        (a redelivery after a crash between commit and acknowledgement)."""
        async with self.store.transaction() as tx:
            archived = await archive_in(tx, message, self.clock())
        if archived is not None:
            self.archived += 1
            reason, source = _why(message)
            log.warning("archived dead letter #%d from %s: %s", archived, source or "?", reason)
        return archived

    async def consume(
        self, subscription: Subscription, stop: asyncio.Event, error_backoff: float
    ) -> None:
        """Archive each delivery, then acknowledge it; on a database error hand it back
        to the broker and pause, so an outage is not a hot loop."""
        async for delivery in subscription:
            try:
                settled = await self.handle(delivery)
            except SagaError as exc:  # the broker refused the settlement: it redelivers
                log.error("dead letter not settled, the broker will redeliver it: %s", exc)
                settled = False
            if not settled:
                await wait_either(stop, None, error_backoff)

    async def handle(self, delivery: Delivery) -> bool:
        try:
            await self.archive(delivery.message)
        except Exception:
            log.exception("dead letter not archived, the broker will redeliver it")
            await delivery.nack()
            return False
        await delivery.ack()
        return True


async def archive_in(tx: StoreTransaction, message: Message, now: datetime) -> int | None:
    """Keep one dead letter (a message as ``dead_letter_copy`` parks it) in ``tx``,
    noted in its saga's history; its archive id, or None if it was kept before."""
    headers = dict(message.headers)
    letter_id = headers.get(DEAD_LETTER_ID) or new_dead_letter_id()
    reason, source = _why(message)
    try:
        envelope: Envelope | None = decode(message.body, ANY_SIZE)
    except DecodeError:
        envelope = None
    record = DeadLetterRecord(
        letter_id=letter_id[:64],
        source=source[:255],
        reason=reason,
        key=message.key[:255],
        body=message.body,
        headers=headers,
        saga_id=envelope.saga_id[:255] if envelope is not None else None,
        received_at=now,
    )
    archived = await tx.add_dead_letter(record)
    if archived is not None and envelope is not None and await tx.saga_exists(envelope.saga_id):
        detail = (
            f"{describe(envelope)} dead-lettered from {source or 'an unknown source'}: "
            f"{reason} (dead letter #{archived})"
        )
        entry = HistoryEntry(now, "dead_lettered", envelope.step[:200], detail)
        await tx.add_history(envelope.saga_id, [entry])
    return archived


def _why(message: Message) -> tuple[str, str]:
    """A dead letter's reason and source destination, as its headers say."""
    headers = message.headers
    reason = headers.get(DEAD_LETTER_REASON) or headers.get(_BROKER_REASON) or "no reason given"
    source = headers.get(DEAD_LETTER_SOURCE) or headers.get(_BROKER_SOURCE) or ""
    return reason, source
