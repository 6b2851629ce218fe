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
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, exists, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from engine.clock import utc_now
from engine.errors import BusinessFailure
from engine.messages import Envelope, MessageKind, Outcome
from engine.store.schema import barrier
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


async def _record(
    session: AsyncSession,
    participant: str,
    envelope: Envelope,
    op: str,
    outcome: Outcome | str,
    reply: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    await session.execute(
        insert(barrier).values(
            participant=participant,
            saga_id=envelope.saga_id,
            step=envelope.step,
            op=op,
            origin=envelope.kind.value,
            outcome=str(outcome),
            reply=reply,
            error=error,
            created_at=utc_now(),
        )
    )


async def _run(
    session: AsyncSession, registration: Registration, envelope: Envelope
) -> tuple[Outcome, dict[str, Any], str | None]:
    """Run the handler in a savepoint; a business failure undoes its writes."""
    try:
        command = registration.parse(envelope.payload)
    except ValidationError as exc:
        return Outcome.FAILURE, {}, f"invalid {envelope.name} payload: {exc.errors()[0]['msg']}"
    context = HandlerContext(
        session=session,
        saga_id=envelope.saga_id,
        step=envelope.step,
        attempt=envelope.attempt,
        message_id=envelope.message_id,
        headers=envelope.headers,
    )
    try:
        async with session.begin_nested():
            result = await registration.handler(command, context)
            # Flush inside the savepoint so a constraint violation is the handler's.
            await session.flush()
    except BusinessFailure as failure:
        return Outcome.FAILURE, {}, failure.reason
    except IntegrityError as exc:
        orig = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise HandlerIntegrityError(orig[0] if orig else type(exc).__name__) from exc
    return Outcome.SUCCESS, _payload(result), None


async def guarded(
    session: AsyncSession, participant: str, registration: Registration, envelope: Envelope
) -> Envelope:
    """Handle ``envelope`` once, in ``session``'s transaction; return the reply to send."""
    rows = {
        r.op: r
        for r in await session.execute(
            select(barrier).where(
                barrier.c.participant == participant,
                barrier.c.saga_id == envelope.saga_id,
                barrier.c.step == envelope.step,
            )
        )
    }
    action = rows.get(ACTION)
    if envelope.kind is MessageKind.COMMAND:
        if action is None and COMPENSATION in rows:
            # Only pruning leaves a compensation without its action's row; the step
            # was compensated, so the action is refused like any hanging one.
            return envelope.reply(Outcome.FAILURE, error=REFUSED)
        if action is not None:
            if action.origin == COMPENSATION:
                return envelope.reply(Outcome.FAILURE, error=REFUSED)
            return envelope.reply(Outcome(action.outcome), action.reply, action.error)
        outcome, payload, error = await _run(session, registration, envelope)
        await _record(session, participant, envelope, ACTION, outcome, payload, error)
        return envelope.reply(outcome, payload, error)

    done = rows.get(COMPENSATION)
    if done is not None:
        return envelope.reply(Outcome(done.outcome), done.reply, done.error)
    if action is None:
        # Null compensation: nothing to undo, and the action must never run now.
        await _record(session, participant, envelope, ACTION, "skipped")
        await _record(session, participant, envelope, COMPENSATION, Outcome.SUCCESS)
        return envelope.reply(Outcome.SUCCESS)
    if action.outcome != Outcome.SUCCESS:
        # The action failed and rolled its writes back: nothing to undo either.
        await _record(session, participant, envelope, COMPENSATION, Outcome.SUCCESS)
        return envelope.reply(Outcome.SUCCESS)
    outcome, payload, error = await _run(session, registration, envelope)
    if outcome is Outcome.SUCCESS:
        await _record(session, participant, envelope, COMPENSATION, outcome, payload)
    return envelope.reply(outcome, payload, error)


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

    Other workers of the same participant may prune at once: on PostgreSQL the rows are
    picked with ``FOR UPDATE SKIP LOCKED``, so they take disjoint ones.
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
        result = await conn.execute(delete(barrier).where(key.in_(chosen)))
        return int(result.rowcount)
