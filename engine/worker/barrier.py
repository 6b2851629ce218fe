"""The participant barrier (after DTM's sub-transaction barrier).

Runs a handler inside the worker's own transaction next to a row per (saga, step,
op) that makes the three delivery anomalies harmless:

* duplicate delivery: the row exists, the stored outcome is replied, no effect runs;
* null compensation (compensation before its action): the compensation writes the
  action's row itself, replies success and runs nothing;
* hanging action (action after its compensation): that row is found, the action is
  refused.

A concurrent duplicate loses on the primary key and its transaction rolls back.

The rows are pruned by age (:func:`prune`); a row must outlive every copy of its
message, or the anomaly it guards against comes back.

:class:`SqlBarrier` is this module's implementation of the runner's barrier protocol
(:class:`engine.worker.base.Barrier`), over the participant's SQLAlchemy database.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from time import monotonic
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, event, exists, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from engine.clock import utc_now
from engine.database import one_writer, reading
from engine.errors import BusinessFailure, LimitError
from engine.limits import DEFAULT_LIMITS, Limits
from engine.messages import Envelope, MessageKind, Outcome, sized
from engine.store.schema import barrier
from engine.worker.base import ConcurrentDuplicate, Outcomes, Recorded
from engine.worker.worker import HandlerContext, HandlerResult, Registration

ACTION = "action"
COMPENSATION = "compensation"

REFUSED = "refused: the step was already compensated (hanging action)"


class HandlerIntegrityError(Exception):
    """The handler's own writes broke a database constraint.

    A handler error like any other (replied as a transient error, so the saga's retry
    policy decides), not to be confused with a concurrent duplicate losing the race for
    the barrier row, which the runner answers by redelivery.
    """


def _payload(result: HandlerResult) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return dict(result)


#: Barrier rows by (saga, step, op).
Rows = Outcomes


async def read_rows(
    reader: AsyncSession | AsyncConnection, participant: str, envelopes: Sequence[Envelope]
) -> Rows:
    """``participant``'s barrier rows of ``envelopes``' sagas, in one query."""
    saga_ids = sorted({e.saga_id for e in envelopes})
    if not saga_ids:
        return {}
    where = (
        barrier.c.saga_id == saga_ids[0] if len(saga_ids) == 1 else barrier.c.saga_id.in_(saga_ids)
    )
    result = await reader.execute(
        select(barrier).where(barrier.c.participant == participant, where)
    )
    return {
        (r.saga_id, r.step, r.op): Recorded(r.origin, r.outcome, r.reply, r.error) for r in result
    }


class BarrierBook:
    """The barrier rows of a batch of messages: read in one query, consulted and
    extended in memory as the batch is handled in order (a command and its
    compensation may share a batch), and written in one statement before the commit.

    The rows may also be read before the transaction (``rows``): a row that a
    concurrent copy commits meanwhile still stops this one, on the primary key at
    :meth:`flush`, since every decision to run something writes a row.
    """

    def __init__(self, session: AsyncSession, participant: str, rows: Rows | None = None) -> None:
        self.session = session
        self.participant = participant
        self._rows: Rows = dict(rows or {})
        self._new: list[dict[str, Any]] = []

    @property
    def rows(self) -> Rows:
        """The rows read, and those this book recorded."""
        return self._rows

    async def load(self, envelopes: Sequence[Envelope]) -> None:
        """Read the rows of ``envelopes``' sagas in the session's transaction."""
        self._rows.update(await read_rows(self.session, self.participant, envelopes))

    def get(self, envelope: Envelope, op: str) -> Recorded | None:
        return self._rows.get((envelope.saga_id, envelope.step, op))

    def record(
        self,
        envelope: Envelope,
        op: str,
        outcome: Outcome | str,
        reply: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        row = Recorded(envelope.kind.value, str(outcome), reply, error)
        self._rows[(envelope.saga_id, envelope.step, op)] = row
        self._new.append(
            {
                "participant": self.participant,
                "saga_id": envelope.saga_id,
                "step": envelope.step,
                "op": op,
                "origin": row.origin,
                "outcome": row.outcome,
                "reply": reply,
                "error": error,
                "created_at": utc_now(),
            }
        )

    async def flush(self) -> None:
        """Write the new rows; a concurrent duplicate's row makes this raise
        IntegrityError, and the whole transaction rolls back."""
        if self._new:
            new, self._new = self._new, []
            await self.session.execute(insert(barrier), new)


class _ReplyRefused(Exception):
    """The handler's reply is over the limits: its writes are undone like a failure's."""


async def _run(
    session: AsyncSession,
    participant: str,
    registration: Registration,
    envelope: Envelope,
    limits: Limits,
) -> Envelope:
    """Run the handler in a savepoint and return its reply; a business failure, or a
    reply over the limits (too large, or holding a NUL), undoes its writes and is
    replied as a failure.

    SQLAlchemy begins the savepoint (and the transaction, if the barrier was read
    before it) at the handler's first statement: what the handler awaits before it
    first uses its session holds no lock.
    """
    try:
        command = registration.parse(envelope.payload)
    except ValidationError as exc:
        error = f"invalid {envelope.name} payload: {exc.errors()[0]['msg']}"
        return envelope.reply(Outcome.FAILURE, error=error)
    context = HandlerContext(
        session=session,
        saga_id=envelope.saga_id,
        step=envelope.step,
        attempt=envelope.attempt,
        message_id=envelope.message_id,
        headers=envelope.headers,
        participant=participant,
        kind=envelope.kind,
    )
    try:
        async with session.begin_nested():
            result = await registration.handler(command, context)
            # Flush inside the savepoint so a constraint violation is the handler's.
            await session.flush()
            reply = envelope.reply(Outcome.SUCCESS, _payload(result))
            try:
                sized(reply, limits)
            except LimitError as exc:
                raise _ReplyRefused(f"reply not sent: {exc}") from None
    except BusinessFailure as failure:
        return envelope.reply(Outcome.FAILURE, error=failure.reason)
    except _ReplyRefused as refused:
        return envelope.reply(Outcome.FAILURE, error=str(refused))
    except IntegrityError as exc:
        orig = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise HandlerIntegrityError(orig[0] if orig else type(exc).__name__) from exc
    return reply


async def guarded(
    session: AsyncSession,
    participant: str,
    registration: Registration,
    envelope: Envelope,
    book: BarrierBook | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Envelope:
    """Handle ``envelope`` once, in ``session``'s transaction; return the reply to send.

    With a ``book`` (a batch), the caller loaded it and flushes it before committing.
    A reply over ``limits`` is recorded and sent as the failure it becomes, so a
    redelivery gets the same answer.
    """
    if book is None:
        single = BarrierBook(session, participant)
        await single.load([envelope])
        reply = await guarded(session, participant, registration, envelope, single, limits=limits)
        await single.flush()
        return reply
    action = book.get(envelope, ACTION)
    if envelope.kind is MessageKind.COMMAND:
        if action is None and book.get(envelope, COMPENSATION) is not None:
            # Only pruning leaves a compensation without its action's row; the step
            # was compensated, so the action is refused like any hanging one.
            return envelope.reply(Outcome.FAILURE, error=REFUSED)
        if action is not None:
            if action.origin == COMPENSATION:
                return envelope.reply(Outcome.FAILURE, error=REFUSED)
            return envelope.reply(Outcome(action.outcome), action.reply, action.error)
        reply = await _run(session, participant, registration, envelope, limits)
        assert reply.outcome is not None
        book.record(envelope, ACTION, reply.outcome, reply.payload, reply.error)
        return reply

    done = book.get(envelope, COMPENSATION)
    if done is not None:
        return envelope.reply(Outcome(done.outcome), done.reply, done.error)
    if action is None:
        # Null compensation: nothing to undo, and the action must never run now.
        book.record(envelope, ACTION, "skipped")
        book.record(envelope, COMPENSATION, Outcome.SUCCESS)
        return envelope.reply(Outcome.SUCCESS)
    if action.outcome != Outcome.SUCCESS:
        # The action failed and rolled its writes back: nothing to undo either.
        book.record(envelope, COMPENSATION, Outcome.SUCCESS)
        return envelope.reply(Outcome.SUCCESS)
    reply = await _run(session, participant, registration, envelope, limits)
    if reply.outcome is Outcome.SUCCESS:
        book.record(envelope, COMPENSATION, reply.outcome, reply.payload)
    return reply


async def prune(database: AsyncEngine, participant: str, before: datetime, limit: int) -> int:
    """Delete up to about ``limit`` of ``participant``'s barrier rows; returns how many.

    A step's rows go together, once all of them are older than ``before``: never an
    action's row while its compensation's is young (the hanging-action guard is that
    row). Pruning is safe only if no copy of the step's messages can arrive any more:
    once the rows are gone, a duplicate command runs its effect a second time and an
    action arriving after its compensation is no longer refused. So the retention must
    be longer than the longest a command can come back: redelivery after a crash
    (seconds), a consumer group that lost its offsets re-reading a Kafka topic from the
    oldest message it retains (7 days by default, and up to a segment longer), a dead
    letter replayed with ``--force``. Hence a default of 30 days; see the README.

    Other workers of the same participant may prune at once: on PostgreSQL one of them
    at a time holds a transaction-scoped advisory lock and the others remove nothing
    this round. (Rows picked with ``SKIP LOCKED`` alone are not enough: deleting a
    step's rows together, two pruners that had each locked one row of the same step
    waited on each other's, a deadlock.) Handlers writing rows are skipped, not waited for.
    """
    newer = barrier.alias("newer")
    young_sibling = exists().where(
        newer.c.participant == barrier.c.participant,
        newer.c.saga_id == barrier.c.saga_id,
        newer.c.step == barrier.c.step,
        newer.c.created_at >= before,
    )
    chosen = (
        select(barrier.c.participant, barrier.c.saga_id, barrier.c.step)
        .where(barrier.c.participant == participant, barrier.c.created_at < before)
        .where(~young_sibling)
        .limit(limit)
        .with_for_update(skip_locked=True, of=barrier)
    )
    key = tuple_(barrier.c.participant, barrier.c.saga_id, barrier.c.step)
    async with database.begin() as conn:
        if conn.dialect.name == "postgresql":
            held = await conn.scalar(
                select(func.pg_try_advisory_xact_lock(_prune_lock(participant)))
            )
            if not held:
                return 0
        result = await conn.execute(delete(barrier).where(key.in_(chosen)))
        return int(result.rowcount)


def _prune_lock(participant: str) -> int:
    """The advisory lock key of ``participant``'s pruning (a signed 64-bit integer)."""
    digest = hashlib.blake2b(f"saga-barrier-prune:{participant}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


#: Key in a barrier session's ``info``: when its transaction began on a connection.
BEGAN = "saga_began"


class _TimedSession(Session):
    """A session that notes when its transaction began on a connection, which on
    SQLite is when it took the write lock."""


@event.listens_for(_TimedSession, "after_begin")
def _note_begin(session: Session, _transaction: Any, _connection: Any) -> None:
    session.info[BEGAN] = monotonic()


class SqlBarrierTransaction:
    """The handlers' session (their ``ctx.session``) and the batch's barrier rows."""

    def __init__(self, session: AsyncSession, book: BarrierBook, limits: Limits) -> None:
        self.session = session
        self.book = book
        self.limits = limits

    @property
    def began(self) -> float | None:
        began = self.session.info.get(BEGAN)
        return began if isinstance(began, float) else None

    async def handle(self, registration: Registration, envelope: Envelope) -> Envelope:
        return await guarded(
            self.session,
            self.book.participant,
            registration,
            envelope,
            self.book,
            limits=self.limits,
        )

    async def intact(self) -> bool:
        # A savepoint left open did not roll back; a lost connection invalidates the
        # transaction without SQLAlchemy ending it (its commit would fail).
        if self.session.in_nested_transaction():
            return False
        if self.began is None:  # no statement yet: nothing on a connection to lose
            return True
        try:
            connection = await self.session.connection()
        except Exception:
            return False
        transaction = connection.get_transaction()
        return transaction is not None and transaction.is_valid


class SqlBarrier:
    """The barrier over a participant's SQLAlchemy database (its ``barrier`` table)."""

    def __init__(self, database: AsyncEngine) -> None:
        self.database = database
        self.sessions = async_sessionmaker(
            database, expire_on_commit=False, sync_session_class=_TimedSession
        )
        self.one_writer = one_writer(database)

    async def recorded(self, participant: str, envelopes: Sequence[Envelope]) -> Outcomes:
        async with reading(self.database) as conn:
            return await read_rows(conn, participant, envelopes)

    @asynccontextmanager
    async def transaction(
        self,
        participant: str,
        envelopes: Sequence[Envelope],
        *,
        known: Outcomes | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> AsyncIterator[SqlBarrierTransaction]:
        async with self.sessions() as session:
            try:
                async with session.begin():
                    book = BarrierBook(session, participant, known)
                    if known is None:
                        await book.load(envelopes)
                    yield SqlBarrierTransaction(session, book, limits)
                    await book.flush()
            except IntegrityError as exc:  # a concurrent copy's row, at flush or commit
                raise ConcurrentDuplicate(str(exc.orig or exc)) from exc
        if known is not None:
            known.update(book.rows)  # committed

    async def prune(self, participant: str, before: datetime, limit: int) -> int:
        return await prune(self.database, participant, before, limit)
