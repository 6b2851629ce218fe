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
from engine.limits import ANY_SIZE, storable
from engine.messages import Envelope, decode
from engine.model import HistoryEntry
from engine.redact import redact
from engine.store.base import DeadLetterRecord, SagaStore, StoreTransaction
from engine.store.failures import error_text, is_transient
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


def letter_record(
    message: Message, *, reason: str, source: str, letter_id: str, received_at: datetime
) -> tuple[DeadLetterRecord, Envelope | None]:
    """The archive row of a dead letter, every text made storable (a NUL shown as
    ``\\x00``, lengths cut to their columns, the reason redacted), and its envelope
    if the body is one."""
    try:
        envelope: Envelope | None = decode(message.body, ANY_SIZE)
    except DecodeError:
        envelope = None
    record = DeadLetterRecord(
        letter_id=storable(letter_id)[:64],
        source=storable(source)[:255],
        reason=storable(redact(reason)),
        key=storable(message.key)[:255],
        body=message.body,
        headers={storable(k): storable(v) for k, v in message.headers.items()},
        saga_id=storable(envelope.saga_id)[:255] if envelope is not None else None,
        received_at=received_at,
    )
    return record, envelope


async def keep_dead_letter(
    tx: StoreTransaction, record: DeadLetterRecord, envelope: Envelope | None
) -> int | None:
    """Archive a dead letter in ``tx`` and, if its body names an existing saga, record
    it in that saga's history; None if its letter id was archived before."""
    archived = await tx.add_dead_letter(record)
    if archived is not None and envelope is not None and await tx.saga_exists(envelope.saga_id):
        detail = (
            f"{describe(envelope)} dead-lettered from {record.source or 'an unknown source'}: "
            f"{record.reason} (dead letter #{archived})"
        )
        entry = HistoryEntry(record.received_at, "dead_lettered", envelope.step[:200], detail)
        await tx.add_history(envelope.saga_id, [entry])
    return archived


class DeadLetterArchive:
    def __init__(
        self,
        store: SagaStore,
        *,
        clock: Clock = utc_now,
        failure_attempts: int = 3,
        failure_backoff: float = 0.1,
    ) -> None:
        self.store = store
        self.clock = clock
        #: Tries of a dead letter that fails with an error that is not transient,
        #: before it is archived minimally (body kept).
        self.failure_attempts = failure_attempts
        self.failure_backoff = failure_backoff
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

    async def archive_minimally(self, message: Message, error: BaseException) -> int | None:
        """Keep a dead letter whose full record the database refused: its body, where it
        came from, and why it could not be kept whole; no headers, no saga history."""
        headers = message.headers
        reason, source = _why(message)
        record = DeadLetterRecord(
            letter_id=storable(headers.get(DEAD_LETTER_ID) or new_dead_letter_id())[:64],
            source=storable(source)[:255],
            reason=storable(f"{reason[:1000]} (archived without headers: {error_text(error)})"),
            key="",
            body=message.body,
            headers={},
            saga_id=None,
            received_at=self.clock(),
        )
        async with self.store.transaction() as tx:
            archived = await tx.add_dead_letter(record)
        if archived is not None:
            self.archived += 1
            log.warning("archived dead letter #%d minimally: %s", archived, record.reason)
        return archived

    async def consume(
        self, subscription: Subscription, stop: asyncio.Event, error_backoff: float
    ) -> None:
        """Archive each delivery, then acknowledge it; on a transient database error
        hand it back to the broker and pause, so an outage is not a hot loop."""
        async for delivery in subscription:
            try:
                settled = await self.handle(delivery)
            except SagaError as exc:  # the broker refused the settlement: it redelivers
                log.error("dead letter not settled, the broker will redeliver it: %s", exc)
                settled = False
            if not settled:
                await wait_either(stop, None, error_backoff)

    async def handle(self, delivery: Delivery) -> bool:
        """Archive one delivery and acknowledge it; False if it was handed back.

        A transient error (the database is away) hands it back to the broker. Any other
        error is this message's own: after ``failure_attempts`` tries it is archived
        minimally and, if even that is refused, acknowledged with an error line, so one
        dead letter never stops the archive.
        """
        error: BaseException | None = None
        for attempt in range(1, self.failure_attempts + 1):
            try:
                await self.archive(delivery.message)
            except Exception as exc:
                if is_transient(exc):
                    log.error("dead letter not archived, the broker will redeliver it: %s", exc)
                    await delivery.nack()
                    return False
                error = exc
                log.warning(
                    "dead letter not archived (try %d of %d): %s",
                    attempt,
                    self.failure_attempts,
                    error_text(exc),
                )
                if attempt < self.failure_attempts:
                    await asyncio.sleep(self.failure_backoff)
                continue
            await delivery.ack()
            return True
        assert error is not None
        try:
            await self.archive_minimally(delivery.message, error)
        except Exception as exc:
            if is_transient(exc):
                await delivery.nack()
                return False
            log.error(
                "dead letter dropped, the database refused even its body (%s); it was: %r",
                error_text(exc),
                delivery.message.body[:200],
            )
        await delivery.ack()
        return True


async def archive_in(tx: StoreTransaction, message: Message, now: datetime) -> int | None:
    """Keep one dead letter (a message as ``dead_letter_copy`` parks it) in ``tx``,
    noted in its saga's history; its archive id, or None if it was kept before."""
    reason, source = _why(message)
    record, envelope = letter_record(
        message,
        reason=reason,
        source=source,
        letter_id=message.headers.get(DEAD_LETTER_ID) or new_dead_letter_id(),
        received_at=now,
    )
    return await keep_dead_letter(tx, record, envelope)


def _why(message: Message) -> tuple[str, str]:
    """A dead letter's reason and source destination, as its headers say."""
    headers = message.headers
    reason = headers.get(DEAD_LETTER_REASON) or headers.get(_BROKER_REASON) or "no reason given"
    source = headers.get(DEAD_LETTER_SOURCE) or headers.get(_BROKER_SOURCE) or ""
    return reason, source
