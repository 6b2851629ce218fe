"""The SQL adapter of the storage protocol (SQLAlchemy Core, any async dialect).

Dialect differences are confined here: ``FOR UPDATE SKIP LOCKED`` renders only where
the database has it (PostgreSQL); SQLite serialises writers instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from engine.clock import utc_now
from engine.errors import ConcurrencyConflict
from engine.messages import MessageKind, encode, new_message_id
from engine.model import (
    TIMEOUTS,
    HistoryEntry,
    OutboxMessage,
    ParentLink,
    SagaState,
    StepState,
    Timer,
    TimerKind,
)
from engine.states import SagaStatus, StepStatus
from engine.store.base import (
    DeadLetterRecord,
    DeferredReply,
    DueTimer,
    KeptReply,
    OutboxRecord,
    OutboxSignal,
    PruneCounts,
    SagaIdTaken,
    ServedDefinition,
)
from engine.store.schema import (
    UTCDateTime,
    dead_letters,
    deferred_replies,
    held_replies,
    history,
    inbox,
    outbox,
    saga_keys,
    sagas,
    served,
    steps,
    timers,
)
from engine.views import (
    DeadLetterRef,
    DeadLetterView,
    HeldCount,
    HistoryView,
    RunningDefinition,
    SagaCount,
    SagaCursor,
    SagaDetail,
    SagaSummary,
    StepView,
    StoreStats,
    TimeRange,
    dead_letter_view,
)

#: Sagas still in progress, for the "oldest running" figure of the stats.
_IN_PROGRESS = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)
#: Sagas ``sagactl prune`` may remove. Never running, compensating or parked ones.
_FINISHED = (SagaStatus.COMPLETED.value, SagaStatus.COMPENSATED.value)
#: Registrations expired longer ago than this are deleted by the next engine to register.
_FORGET = timedelta(days=1)
#: Longest saga id there can be (the saga_instances key).
_SAGA_ID_LENGTH = 36


#: A step's fields as a tuple, to tell which steps a transition changed. Shallow (not
#: ``dataclasses.astuple``, which deep-copies and was a fifth of the engine's CPU):
#: the state machine replaces a step's reply, it never edits one in place. Its timer
#: lives in saga_timers, so it is compared apart.
_step_snapshot = attrgetter(*(f.name for f in fields(StepState) if f.name != "timer"))


def _timers_of(state: SagaState) -> dict[str, Timer]:
    return {st.name: st.timer for st in state.steps.values() if st.timer is not None}


def _step_row(saga_id: str, st: StepState) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "name": st.name,
        "position": st.position,
        "status": st.status.value,
        "attempt": st.attempt,
        "compensation_attempt": st.compensation_attempt,
        "started_at": st.started_at,
        "finished_at": st.finished_at,
        "reply": st.reply,
        "error": st.error,
        "attempt_base": st.attempt_base,
        "compensation_attempt_base": st.compensation_attempt_base,
        "awaiting_kind": st.awaiting.value if st.awaiting is not None else None,
        "completed": st.completed,
        "lane": st.lane,
    }


def _saga_values(state: SagaState) -> dict[str, Any]:
    return {
        "status": state.status.value,
        "error": state.error,
        "trace_id": state.trace_id,
        "trace_context": state.trace_context or None,
        "parent": state.parent.as_json() if state.parent is not None else None,
        "updated_at": state.updated_at,
    }


def _of_saga(saga_id: str, step: str | None) -> list[ColumnElement[bool]]:
    """Outbox rows of a saga, or of one of its steps. Rows written before the step
    was recorded (NULL) count for every step: a timeout is postponed rather than
    fired early."""
    where: list[ColumnElement[bool]] = [outbox.c.key == saga_id]
    if step is not None:
        where.append(or_(outbox.c.step == step, outbox.c.step.is_(None)))
    return where


def _timer_row(saga_id: str, timer: Timer) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "kind": timer.kind.value,
        "step": timer.step,
        "attempt": timer.attempt,
        "due_at": timer.due_at,
    }


def _timer_of(row: Any) -> Timer:
    return Timer(TimerKind(row.kind), row.step, row.attempt, row.due_at)


def _upsert(dialect: str) -> Any:
    """The dialect's ``insert`` (it has ``on_conflict_do_nothing``): PostgreSQL's or
    SQLite's, imported when first used, so a process on SQLite never loads the
    PostgreSQL dialect's module (``sagactl`` starts faster)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


class SqlStoreTransaction:
    """One database transaction; remembers what it loaded to write only changes."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._loaded: dict[str, tuple[dict[str, tuple[Any, ...]], dict[str, Timer]]] = {}
        #: Sagas whose rows this transaction holds locked (:meth:`lock_sagas`).
        self._locked: set[str] = set()

    async def insert_saga(self, state: SagaState) -> None:
        try:
            await self.conn.execute(
                insert(sagas).values(
                    id=state.id,
                    name=state.name,
                    version=state.version,
                    input=state.input,
                    row_version=state.row_version,
                    created_at=state.created_at,
                    fingerprint=state.fingerprint,
                    **_saga_values(state),
                )
            )
        except IntegrityError:  # the primary key: the id is taken
            raise SagaIdTaken(f"a saga with id {state.id!r} already exists") from None
        await self.conn.execute(
            insert(steps), [_step_row(state.id, st) for st in state.ordered_steps()]
        )
        if state.keys:
            await self.conn.execute(
                insert(saga_keys),
                [{"saga_id": state.id, "name": k, "value": v} for k, v in state.keys.items()],
            )
        if new_timers := [_timer_row(state.id, t) for t in state.timers()]:
            await self.conn.execute(insert(timers), new_timers)

    async def load_saga(self, saga_id: str) -> SagaState | None:
        row = (await self.conn.execute(select(sagas).where(sagas.c.id == saga_id))).first()
        if row is None:
            return None
        return (await self._images([row]))[saga_id]

    async def lock_sagas(self, saga_ids: Iterable[str]) -> dict[str, SagaState]:
        # Locked in id order, so two replicas locking overlapping sets cannot
        # deadlock; NO KEY UPDATE, so inserts that only reference a saga don't wait.
        ids = sorted(set(saga_ids))
        if not ids:
            return {}
        rows = await self.conn.execute(
            select(sagas)
            .where(sagas.c.id.in_(ids))
            .order_by(sagas.c.id)
            .with_for_update(key_share=True)
        )
        states = await self._images(list(rows))
        if self.conn.dialect.name == "postgresql":
            self._locked.update(states)
        return states

    async def _images(self, rows: Sequence[Any]) -> dict[str, SagaState]:
        """Saga images with their steps and timers, three queries for any number."""
        states: dict[str, SagaState] = {}
        for row in rows:
            states[row.id] = SagaState(
                id=row.id,
                name=row.name,
                version=row.version,
                input=row.input,
                created_at=row.created_at,
                updated_at=row.updated_at,
                status=SagaStatus(row.status),
                error=row.error,
                trace_id=row.trace_id,
                trace_context=dict(row.trace_context or {}),
                row_version=row.row_version,
                parent=ParentLink.from_json(row.parent) if row.parent else None,
                fingerprint=row.fingerprint,
                held=row.held,
            )
        if not states:
            return states
        ids = list(states)
        one = len(ids) == 1
        step_filter = steps.c.saga_id == ids[0] if one else steps.c.saga_id.in_(ids)
        for s in await self.conn.execute(select(steps).where(step_filter)):
            states[s.saga_id].steps[s.name] = StepState(
                name=s.name,
                position=s.position,
                status=StepStatus(s.status),
                attempt=s.attempt,
                compensation_attempt=s.compensation_attempt,
                started_at=s.started_at,
                finished_at=s.finished_at,
                reply=s.reply,
                error=s.error,
                attempt_base=s.attempt_base,
                compensation_attempt_base=s.compensation_attempt_base,
                awaiting=MessageKind(s.awaiting_kind) if s.awaiting_kind is not None else None,
                completed=s.completed,
                lane=s.lane,
            )
        timer_filter = timers.c.saga_id == ids[0] if one else timers.c.saga_id.in_(ids)
        for t in await self.conn.execute(select(timers).where(timer_filter)):
            step = states[t.saga_id].steps.get(t.step)
            if step is not None:
                step.timer = _timer_of(t)
        for state in states.values():
            self._loaded[state.id] = (
                {n: _step_snapshot(s) for n, s in state.steps.items()},
                _timers_of(state),
            )
        return states

    async def save_saga(self, state: SagaState) -> None:
        await self.save_sagas([state])

    async def save_sagas(self, states: Sequence[SagaState]) -> None:
        """Write changed sagas, a fixed number of statements however many there are."""
        if not states:
            return
        update_sagas = update(sagas).where(
            sagas.c.id == bindparam("b_id"), sagas.c.row_version == bindparam("b_row_version")
        )
        rows = [
            {
                "b_id": s.id,
                "b_row_version": s.row_version,
                "row_version": s.row_version + 1,
                **_saga_values(s),
            }
            for s in states
        ]
        if len(rows) == 1:
            result = await self.conn.execute(update_sagas, rows[0])
            if result.rowcount != 1:
                raise ConcurrencyConflict(f"saga {states[0].id} was advanced by another writer")
        elif self.conn.dialect.supports_sane_multi_rowcount:
            result = await self.conn.execute(update_sagas, rows)
            if result.rowcount != len(rows):
                raise ConcurrencyConflict("a saga of the batch was advanced by another writer")
        elif all(s.id in self._locked for s in states):
            # Rows this transaction holds locked cannot have moved since they were read.
            await self.conn.execute(update_sagas, rows)
        else:
            for state, row in zip(states, rows, strict=True):
                result = await self.conn.execute(update_sagas, row)
                if result.rowcount != 1:
                    raise ConcurrencyConflict(f"saga {state.id} was advanced by another writer")
        step_rows: list[dict[str, Any]] = []
        #: (saga, step) whose timer row goes; sagas whose timer rows all go.
        timer_deletes: list[tuple[str, str]] = []
        saga_timer_deletes: list[str] = []
        timer_inserts: list[dict[str, Any]] = []
        timer_updates: list[dict[str, Any]] = []
        for state in states:
            state.row_version += 1
            loaded = self._loaded.get(state.id)
            old_steps, old_timers = loaded if loaded is not None else ({}, {})
            new_steps = {n: _step_snapshot(st) for n, st in state.steps.items()}
            for name, st in state.steps.items():
                if old_steps.get(name) != new_steps[name]:
                    row = _step_row(state.id, st)
                    del row["saga_id"], row["name"]
                    step_rows.append({"b_saga_id": state.id, "b_name": name, **row})
            new_timers = _timers_of(state)
            if loaded is None:
                # An image from another transaction: what its timer rows hold is unknown.
                saga_timer_deletes.append(state.id)
                timer_inserts.extend(_timer_row(state.id, t) for t in new_timers.values())
            elif new_timers != old_timers:
                for step, timer in new_timers.items():
                    old = old_timers.get(step)
                    if old is None:
                        timer_inserts.append(_timer_row(state.id, timer))
                    elif old != timer:
                        timer_updates.append(
                            {"b_saga_id": state.id, "b_step": step, **_timer_row(state.id, timer)}
                        )
                timer_deletes.extend((state.id, step) for step in old_timers.keys() - new_timers)
            self._loaded[state.id] = (new_steps, new_timers)
        if step_rows:
            await self.conn.execute(
                update(steps).where(
                    steps.c.saga_id == bindparam("b_saga_id"), steps.c.name == bindparam("b_name")
                ),
                step_rows,
            )
        if saga_timer_deletes:
            await self.conn.execute(delete(timers).where(timers.c.saga_id.in_(saga_timer_deletes)))
        if timer_deletes:
            await self.conn.execute(
                delete(timers).where(tuple_(timers.c.saga_id, timers.c.step).in_(timer_deletes))
            )
        if timer_inserts:
            await self.conn.execute(insert(timers), timer_inserts)
        if timer_updates:
            await self.conn.execute(
                update(timers).where(
                    timers.c.saga_id == bindparam("b_saga_id"),
                    timers.c.step == bindparam("b_step"),
                ),
                timer_updates,
            )

    async def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        if not messages:
            return
        await self.conn.execute(
            insert(outbox),
            [
                {
                    "message_id": m.envelope.message_id,
                    "destination": m.destination,
                    "key": m.key,
                    "body": encode(m.envelope).decode(),
                    "headers": dict(m.envelope.headers),
                    "created_at": m.envelope.created_at,
                    "sent_at": None,
                    "step": m.envelope.step,
                }
                for m in messages
            ],
        )

    async def add_history(self, saga_id: str, entries: Sequence[HistoryEntry]) -> None:
        await self.add_histories([(saga_id, e) for e in entries])

    async def add_histories(self, entries: Sequence[tuple[str, HistoryEntry]]) -> None:
        if not entries:
            return
        await self.conn.execute(
            insert(history),
            [
                {
                    "saga_id": saga_id,
                    "at": e.at,
                    "event": e.event,
                    "step": e.step,
                    "detail": e.detail,
                    "actor": e.actor,
                }
                for saga_id, e in entries
            ],
        )

    async def claim_inbox(self, message_id: str, consumer: str, saga_id: str | None = None) -> bool:
        return message_id in await self.claim_inboxes({message_id: saga_id}, consumer)

    async def claim_inboxes(self, messages: Mapping[str, str | None], consumer: str) -> set[str]:
        now = utc_now()
        rows = [
            {
                "message_id": m,
                "consumer": consumer,
                "processed_at": now,
                # Longer than any saga row's id: no saga has it, and the reply will be
                # dead-lettered; the column could not hold it either.
                "saga_id": saga_id if saga_id and len(saga_id) <= _SAGA_ID_LENGTH else None,
            }
            # Sorted: two transactions claiming overlapping ids take the keys in one order.
            for m, saga_id in sorted(messages.items())
        ]
        if not rows:
            return set()
        dialect = self.conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            # One round trip; a concurrent claim waits on the key and then does nothing.
            result = await self.conn.execute(
                _upsert(dialect)(inbox).on_conflict_do_nothing().returning(inbox.c.message_id), rows
            )
            return {row.message_id for row in result}
        return {str(row["message_id"]) for row in rows if await self._claim_portably(row)}

    async def _claim_portably(self, row: dict[str, Any]) -> bool:
        """One claim without ON CONFLICT: read, then insert in a savepoint."""
        seen = await self.conn.execute(
            select(inbox.c.message_id).where(inbox.c.message_id == row["message_id"])
        )
        if seen.first() is not None:
            return False
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(insert(inbox).values(row))
        except IntegrityError:
            return False  # a concurrent transaction claimed it between our read and write
        return True

    async def due_timers(
        self, now: datetime, limit: int, *, timeouts_due_by: datetime | None = None
    ) -> list[DueTimer]:
        # Each timer is locked together with its saga row, and skipped if either is
        # taken. A reply being applied locks the saga row, then writes its timer row:
        # locking the timer first and the saga later deadlocked with it (PostgreSQL
        # aborted one of the two after a second). NO KEY UPDATE, so inserts that only
        # reference the saga (history, dead letters) do not wait.
        due = timers.c.due_at <= now
        if timeouts_due_by is not None and timeouts_due_by < now:
            # Retry timers are never held; a timeout past the bound is due.
            due = and_(
                due,
                or_(
                    timers.c.kind.not_in([kind.value for kind in TIMEOUTS]),
                    timers.c.due_at <= timeouts_due_by,
                ),
            )
        rows = await self.conn.execute(
            select(timers)
            .join(sagas, sagas.c.id == timers.c.saga_id)
            .where(due, sagas.c.held_at.is_(None))  # a held saga's timers are paused
            .order_by(timers.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True, key_share=True, of=[timers, sagas])
        )
        return [DueTimer(r.saga_id, _timer_of(r)) for r in rows]

    async def claim_outbox(self, limit: int, *, skip: Collection[str] = ()) -> list[OutboxRecord]:
        unsent: list[ColumnElement[bool]] = [outbox.c.sent_at.is_(None)]
        if skip:
            unsent.append(outbox.c.destination.not_in(sorted(skip)))
        rows = await self.conn.execute(
            select(outbox.c.id, outbox.c.destination, outbox.c.key, outbox.c.body, outbox.c.headers)
            .where(*unsent)
            .order_by(outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [
            OutboxRecord(r.id, r.destination, r.key, r.body.encode(), dict(r.headers or {}))
            for r in rows
        ]

    async def has_unsent(self, saga_id: str, step: str | None = None) -> bool:
        unsent = await self.conn.execute(
            select(outbox.c.id).where(outbox.c.sent_at.is_(None), *_of_saga(saga_id, step)).limit(1)
        )
        return unsent.first() is not None

    async def last_sent(self, saga_id: str, step: str | None = None) -> datetime | None:
        sent = await self.conn.execute(
            select(func.max(outbox.c.sent_at)).where(*_of_saga(saga_id, step))
        )
        at: datetime | None = sent.scalar()
        return at

    async def mark_sent(self, ids: Sequence[int], at: datetime) -> None:
        if ids:
            await self.conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(sent_at=at))

    async def saga_exists(self, saga_id: str) -> bool:
        found = await self.conn.execute(select(sagas.c.id).where(sagas.c.id == saga_id))
        return found.first() is not None

    async def add_raw_outbox(
        self, destination: str, key: str, body: str, headers: dict[str, str], at: datetime
    ) -> None:
        await self.conn.execute(
            insert(outbox).values(
                message_id=new_message_id(),
                destination=destination,
                key=key,
                body=body,
                headers=headers,
                created_at=at,
                sent_at=None,
            )
        )

    async def add_dead_letter(self, letter: DeadLetterRecord) -> int | None:
        seen = await self.conn.execute(
            select(dead_letters.c.id).where(dead_letters.c.letter_id == letter.letter_id)
        )
        if seen.first() is not None:
            return None
        result = await self.conn.execute(
            insert(dead_letters).values(
                letter_id=letter.letter_id,
                source=letter.source,
                reason=letter.reason,
                key=letter.key,
                body=letter.body,
                headers=letter.headers,
                saga_id=letter.saga_id,
                received_at=letter.received_at,
                replayed_at=None,
                replayed_by=None,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    async def load_dead_letter(self, letter: int) -> DeadLetterRecord | None:
        row = (
            await self.conn.execute(select(dead_letters).where(dead_letters.c.id == letter))
        ).first()
        return _dead_letter_of(row) if row is not None else None

    async def defer_replies(self, replies: Sequence[DeferredReply]) -> None:
        if not replies:
            return
        await self.conn.execute(
            _upsert(self.conn.dialect.name)(deferred_replies).on_conflict_do_nothing(),
            [_deferred_row(r) for r in sorted(replies, key=attrgetter("message_id"))],
        )

    async def due_deferred_replies(
        self, now: datetime, limit: int, message_id: str | None = None
    ) -> list[DeferredReply]:
        query = select(deferred_replies).where(deferred_replies.c.next_attempt_at <= now)
        if message_id is not None:
            query = query.where(deferred_replies.c.message_id == message_id)
        rows = await self.conn.execute(
            query.order_by(deferred_replies.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [
            DeferredReply(
                message_id=r.message_id,
                saga_id=r.saga_id,
                key=r.key,
                body=bytes(r.body),
                headers=dict(r.headers or {}),
                first_seen_at=r.first_seen_at,
                next_attempt_at=r.next_attempt_at,
                attempts=r.attempts,
                failures=r.failures,
                last_error=r.last_error,
            )
            for r in rows
        ]

    async def update_deferred_replies(self, replies: Sequence[DeferredReply]) -> None:
        if not replies:
            return
        await self.conn.execute(
            update(deferred_replies).where(
                deferred_replies.c.message_id == bindparam("b_message_id")
            ),
            [
                {
                    "b_message_id": r.message_id,
                    "attempts": r.attempts,
                    "failures": r.failures,
                    "last_error": r.last_error,
                    "next_attempt_at": r.next_attempt_at,
                }
                for r in replies
            ],
        )

    async def delete_deferred_replies(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self.conn.execute(
                delete(deferred_replies).where(deferred_replies.c.message_id.in_(message_ids))
            )

    async def mark_replayed(self, letter: int, at: datetime, by: str) -> bool:
        result = await self.conn.execute(
            update(dead_letters)
            .where(dead_letters.c.id == letter, dead_letters.c.replayed_at.is_(None))
            .values(replayed_at=at, replayed_by=by)
        )
        return bool(result.rowcount == 1)

    # -- held sagas ------------------------------------------------------------------

    async def hold_sagas(self, reasons: Mapping[str, str], at: datetime) -> None:
        if not reasons:
            return
        await self.conn.execute(
            update(sagas)
            .where(sagas.c.id == bindparam("b_id"))
            .values(
                held=bindparam("b_held"),
                held_at=func.coalesce(sagas.c.held_at, literal(at, UTCDateTime)),
            ),
            [{"b_id": saga_id, "b_held": why} for saga_id, why in sorted(reasons.items())],
        )

    async def keep_replies(self, replies: Sequence[KeptReply]) -> None:
        if not replies:
            return
        await self.conn.execute(
            _upsert(self.conn.dialect.name)(held_replies).on_conflict_do_nothing(),
            [
                {
                    "message_id": r.message_id,
                    "saga_id": r.saga_id,
                    "body": r.body,
                    "held_at": r.held_at,
                }
                # One row per message id: a batch may hold two copies of a reply.
                for r in sorted({r.message_id: r for r in replies}.values(), key=_by_id)
            ],
        )

    async def resumable_sagas(
        self, served: Sequence[tuple[str, int, str]], limit: int
    ) -> list[str]:
        if not served:
            return []
        by_definition = or_(
            *(
                and_(
                    sagas.c.name == name,
                    sagas.c.version == version,
                    or_(sagas.c.fingerprint.is_(None), sagas.c.fingerprint == fingerprint),
                )
                for name, version, fingerprint in served
            )
        )
        # Two cheap probes (each by an index), then the chosen rows locked together.
        held = await self.conn.execute(
            select(sagas.c.id).where(sagas.c.held_at.is_not(None), by_definition).limit(limit)
        )
        kept = await self.conn.execute(
            select(held_replies.c.saga_id)
            .join(sagas, sagas.c.id == held_replies.c.saga_id)
            .where(by_definition)
            .order_by(held_replies.c.held_at)
            .limit(limit)
        )
        ids = sorted({r.id for r in held} | {r.saga_id for r in kept})[:limit]
        if not ids:
            return []
        locked = await self.conn.execute(
            select(sagas.c.id)
            .where(sagas.c.id.in_(ids))
            .order_by(sagas.c.id)
            .with_for_update(skip_locked=True, key_share=True)
        )
        return [r.id for r in locked]

    async def release_sagas(self, saga_ids: Sequence[str], at: datetime) -> dict[str, datetime]:
        if not saga_ids:
            return {}
        rows = await self.conn.execute(
            select(sagas.c.id, sagas.c.held_at).where(
                sagas.c.id.in_(list(saga_ids)), sagas.c.held_at.is_not(None)
            )
        )
        since: dict[str, datetime] = {r.id: r.held_at for r in rows}
        if not since:
            return {}
        moved = [
            {
                "b_saga_id": t.saga_id,
                "b_step": t.step,
                "b_kind": t.kind,
                "due_at": t.due_at + (at - since[t.saga_id]),
            }
            for t in await self.conn.execute(
                select(timers).where(timers.c.saga_id.in_(list(since)))
            )
        ]
        if moved:
            await self.conn.execute(
                update(timers).where(
                    timers.c.saga_id == bindparam("b_saga_id"),
                    timers.c.step == bindparam("b_step"),
                    timers.c.kind == bindparam("b_kind"),
                ),
                moved,
            )
        await self.conn.execute(
            update(sagas).where(sagas.c.id.in_(list(since))).values(held=None, held_at=None)
        )
        return since

    async def kept_replies(self, saga_ids: Sequence[str]) -> list[KeptReply]:
        if not saga_ids:
            return []
        rows = await self.conn.execute(
            select(held_replies)
            .where(held_replies.c.saga_id.in_(list(saga_ids)))
            .order_by(held_replies.c.held_at, held_replies.c.message_id)
        )
        return [KeptReply(r.message_id, r.saga_id, bytes(r.body), r.held_at) for r in rows]

    async def delete_kept_replies(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self.conn.execute(
                delete(held_replies).where(held_replies.c.message_id.in_(list(message_ids)))
            )


class SqlSagaStore:
    """Both sides over one database: the write protocol the engine advances sagas
    through (:class:`~engine.store.base.SagaStore`) and the queries the client reads
    (:class:`~engine.store.queries.SagaQueries`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlStoreTransaction]:
        async with self.engine.begin() as conn:
            yield SqlStoreTransaction(conn)

    def outbox_signal(self) -> OutboxSignal | None:
        if self.engine.dialect.name != "postgresql":
            return None
        from engine.store.postgres import PgOutboxSignal  # the PostgreSQL driver, lazily

        return PgOutboxSignal(self.engine)

    async def get_saga(self, saga_id: str) -> SagaDetail | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(sagas).where(sagas.c.id == saga_id))).first()
            if row is None:
                return None
            step_rows = await conn.execute(
                select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.position)
            )
            hist_rows = await conn.execute(
                select(history).where(history.c.saga_id == saga_id).order_by(history.c.id)
            )
            key_rows = await conn.execute(
                select(saga_keys.c.name, saga_keys.c.value)
                .where(saga_keys.c.saga_id == saga_id)
                .order_by(saga_keys.c.name)
            )
            return SagaDetail(
                **_summary_fields(row),
                input=row.input,
                keys={k.name: k.value for k in key_rows},
                trace_id=row.trace_id,
                steps=[
                    StepView(
                        name=s.name,
                        position=s.position,
                        status=StepStatus(s.status),
                        attempts=s.attempt,
                        compensation_attempts=s.compensation_attempt,
                        started_at=s.started_at,
                        finished_at=s.finished_at,
                        error=s.error,
                        reply=s.reply,
                        lane=s.lane,
                        completed=s.completed,
                    )
                    for s in step_rows
                ],
                history=[
                    HistoryView(at=h.at, event=h.event, step=h.step, detail=h.detail, actor=h.actor)
                    for h in hist_rows
                ],
            )

    async def list_sagas(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 50,
        version: int | None = None,
        held: bool = False,
        keys: Mapping[str, str] | None = None,
        created: TimeRange | None = None,
        updated: TimeRange | None = None,
        after: SagaCursor | None = None,
        id_prefix: str | None = None,
    ) -> list[SagaSummary]:
        order = (sagas.c.created_at.desc(), sagas.c.id.desc())
        query = select(sagas).order_by(*order).limit(limit)
        if status is not None:
            query = query.where(sagas.c.status == status.value)
        if name is not None:
            query = query.where(sagas.c.name == name)
        if version is not None:
            query = query.where(sagas.c.version == version)
        if held:
            query = query.where(sagas.c.held_at.is_not(None))
        for key, value in sorted((keys or {}).items()):
            # One probe of ix_saga_keys_name_value per key: the keys AND together.
            query = query.where(
                sagas.c.id.in_(
                    select(saga_keys.c.saga_id).where(
                        saga_keys.c.name == key, saga_keys.c.value == value
                    )
                )
            )
        query = query.where(*_in_range(sagas.c.created_at, created))
        query = query.where(*_in_range(sagas.c.updated_at, updated))
        if id_prefix:
            # LIKE 'prefix%' with % and _ escaped: the console's search by id prefix.
            query = query.where(sagas.c.id.startswith(id_prefix, autoescape=True))
        if after is not None:
            # Strictly after the cursor in (created_at, id) descending: a stable order,
            # so pages neither repeat nor skip a saga when new ones arrive. A row
            # comparison: one range of ix_saga_instances_created (created_at, id).
            query = query.where(
                tuple_(sagas.c.created_at, sagas.c.id)
                < tuple_(literal(after.created_at, UTCDateTime), literal(after.saga_id))
            )
        async with self.engine.connect() as conn:
            return [SagaSummary(**_summary_fields(r)) for r in await conn.execute(query)]

    async def count_by_status(self) -> dict[SagaStatus, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(sagas.c.status, func.count()).group_by(sagas.c.status))
            return {SagaStatus(status): count for status, count in rows}

    async def statuses(self, saga_ids: Sequence[str]) -> dict[str, SagaStatus]:
        out: dict[str, SagaStatus] = {}
        async with self.engine.connect() as conn:
            for start in range(0, len(saga_ids), 500):  # stay under bind-parameter limits
                chunk = list(saga_ids[start : start + 500])
                rows = await conn.execute(
                    select(sagas.c.id, sagas.c.status).where(sagas.c.id.in_(chunk))
                )
                out.update({r.id: SagaStatus(r.status) for r in rows})
        return out

    async def list_dead_letters(
        self, *, limit: int = 50, pending_only: bool = False
    ) -> list[DeadLetterView]:
        query = select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
        if pending_only:
            query = query.where(dead_letters.c.replayed_at.is_(None))
        async with self.engine.connect() as conn:
            return [dead_letter_view(_dead_letter_of(r)) for r in await conn.execute(query)]

    async def pending_dead_letters(
        self,
        *,
        saga_id: str | None = None,
        reason_contains: str | None = None,
        after: int = 0,
        through: int | None = None,
        limit: int = 500,
    ) -> list[DeadLetterRef]:
        query = (
            select(dead_letters.c.id, dead_letters.c.saga_id, dead_letters.c.source)
            .where(_pending_letters(saga_id, reason_contains), dead_letters.c.id > after)
            .order_by(dead_letters.c.id)
            .limit(limit)
        )
        if through is not None:
            query = query.where(dead_letters.c.id <= through)
        async with self.engine.connect() as conn:
            return [
                DeadLetterRef(id=r.id, saga_id=r.saga_id, source=r.source)
                for r in await conn.execute(query)
            ]

    async def count_pending_dead_letters(
        self, *, saga_id: str | None = None, reason_contains: str | None = None
    ) -> int:
        query = select(func.count()).where(_pending_letters(saga_id, reason_contains))
        async with self.engine.connect() as conn:
            return (await conn.scalar(query.select_from(dead_letters))) or 0

    async def stats(self) -> StoreStats:
        async with self.engine.connect() as conn:
            counts = await conn.execute(
                select(sagas.c.name, sagas.c.status, func.count())
                .group_by(sagas.c.name, sagas.c.status)
                .order_by(sagas.c.name, sagas.c.status)
            )
            oldest = (
                await conn.execute(
                    select(sagas)
                    .where(sagas.c.status.in_(_IN_PROGRESS))
                    .order_by(sagas.c.created_at, sagas.c.id)
                    .limit(1)
                )
            ).first()
            unsent = outbox.c.sent_at.is_(None)
            backlog = await conn.scalar(select(func.count()).select_from(outbox).where(unsent))
            oldest_unsent = await conn.scalar(
                select(outbox.c.created_at).where(unsent).order_by(outbox.c.id).limit(1)
            )
            letters = await conn.scalar(select(func.count()).select_from(dead_letters))
            pending = await conn.scalar(
                select(func.count())
                .select_from(dead_letters)
                .where(dead_letters.c.replayed_at.is_(None))
            )
            deferred = await conn.scalar(select(func.count()).select_from(deferred_replies))
            held = await conn.execute(
                select(sagas.c.name, sagas.c.version, func.count(), func.max(sagas.c.held))
                .where(sagas.c.held_at.is_not(None))
                .group_by(sagas.c.name, sagas.c.version)
                .order_by(sagas.c.name, sagas.c.version)
            )
            held_counts = [
                HeldCount(name=n, version=v, count=c, reason=why) for n, v, c, why in held
            ]
        return StoreStats(
            counts=[SagaCount(name=n, status=SagaStatus(s), count=c) for n, s, c in counts],
            oldest_running=SagaSummary(**_summary_fields(oldest)) if oldest is not None else None,
            outbox_unsent=backlog or 0,
            outbox_oldest_unsent_at=oldest_unsent,
            dead_letters_pending=pending or 0,
            dead_letters_total=letters or 0,
            replies_deferred=deferred or 0,
            held=held_counts,
        )

    async def running_definitions(self, sample: int = 20) -> list[RunningDefinition]:
        unfinished = sagas.c.status.not_in(_FINISHED)
        key = (sagas.c.name, sagas.c.version, sagas.c.fingerprint)
        async with self.engine.connect() as conn:
            groups = list(
                await conn.execute(
                    select(*key, func.count()).where(unfinished).group_by(*key).order_by(*key)
                )
            )
            found: list[RunningDefinition] = []
            for name, version, fingerprint, count in groups:
                same = (
                    sagas.c.fingerprint.is_(None)
                    if fingerprint is None
                    else sagas.c.fingerprint == fingerprint
                )
                ids = await conn.execute(
                    select(sagas.c.id)
                    .where(unfinished, sagas.c.name == name, sagas.c.version == version, same)
                    .order_by(sagas.c.created_at, sagas.c.id)
                    .limit(sample)
                )
                found.append(
                    RunningDefinition(
                        name=name,
                        version=version,
                        fingerprint=fingerprint,
                        count=count,
                        saga_ids=[r.id for r in ids],
                    )
                )
            return found

    # -- what the running engines serve -----------------------------------------------

    async def register(
        self,
        engine_id: str,
        definitions: Sequence[tuple[str, int, str]],
        *,
        started_at: datetime,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        async with self.engine.begin() as conn:
            # Rows of engines gone for a day are nobody's: forget them on the way.
            await conn.execute(
                delete(served).where(
                    or_(served.c.engine_id == engine_id, served.c.expires_at < now - _FORGET)
                )
            )
            if definitions:
                await conn.execute(
                    insert(served),
                    [
                        {
                            "engine_id": engine_id,
                            "name": name,
                            "version": version,
                            "fingerprint": fingerprint,
                            "started_at": started_at,
                            "last_seen": now,
                            "expires_at": expires_at,
                        }
                        for name, version, fingerprint in definitions
                    ],
                )

    async def deregister(self, engine_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(served).where(served.c.engine_id == engine_id))

    async def live_definitions(self, now: datetime) -> list[ServedDefinition]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(served)
                .where(served.c.expires_at > now)
                .order_by(served.c.name, served.c.version, served.c.engine_id)
            )
            return [
                ServedDefinition(
                    engine_id=r.engine_id,
                    name=r.name,
                    version=r.version,
                    fingerprint=r.fingerprint,
                    last_seen=r.last_seen,
                    expires_at=r.expires_at,
                )
                for r in rows
            ]

    # -- retention -----------------------------------------------------------------

    async def prune_sent_outbox(self, before: datetime, limit: int) -> int:
        return await self._delete_older(outbox.c.id, outbox.c.sent_at, before, limit)

    async def prune_inbox(self, before: datetime, limit: int) -> int:
        return await self._delete_older(inbox.c.message_id, inbox.c.processed_at, before, limit)

    async def _delete_older(
        self, key: Column[Any], stamp: Column[Any], before: datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` rows whose ``stamp`` is before ``before`` (a NULL
        stamp, an unsent outbox row, never is). SKIP LOCKED (PostgreSQL): replicas
        pruning at once take disjoint rows and never wait on each other; SQLite
        serialises writers anyway."""
        chosen = select(key).where(stamp < before).limit(limit).with_for_update(skip_locked=True)
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(key.table).where(key.in_(chosen)))
            return int(result.rowcount)

    async def count_finished(self, before: datetime) -> PruneCounts:
        ids = select(sagas.c.id).where(_prunable(before))

        async def count(table: Any, condition: ColumnElement[bool]) -> int:
            found = await conn.scalar(select(func.count()).select_from(table).where(condition))
            return int(found or 0)

        async with self.engine.connect() as conn:
            return PruneCounts(
                sagas=await count(sagas, _prunable(before)),
                steps=await count(steps, steps.c.saga_id.in_(ids)),
                history=await count(history, history.c.saga_id.in_(ids)),
                timers=await count(timers, timers.c.saga_id.in_(ids)),
                outbox=await count(outbox, outbox.c.key.in_(ids) & outbox.c.sent_at.is_not(None)),
                inbox=await count(inbox, inbox.c.saga_id.in_(ids)),
            )

    async def prune_finished(self, before: datetime, limit: int) -> PruneCounts:
        async with self.engine.begin() as conn:
            # Lock the chosen saga rows: a late reply or a dead-letter replay writing to
            # one of them either finished first (and the saga is re-judged next batch)
            # or waits and then finds it gone. Locked ones are skipped, not waited for.
            chosen = await conn.execute(
                select(sagas.c.id)
                .where(_prunable(before))
                .order_by(sagas.c.updated_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ids = [r.id for r in chosen]
            if not ids:
                return PruneCounts()

            async def gone(statement: Any) -> int:
                return int((await conn.execute(statement)).rowcount)

            # Children first: correct without ON DELETE CASCADE, and counted (the
            # keys are part of the saga row, found by an index: not counted apart).
            await conn.execute(delete(saga_keys).where(saga_keys.c.saga_id.in_(ids)))
            return PruneCounts(
                history=await gone(delete(history).where(history.c.saga_id.in_(ids))),
                steps=await gone(delete(steps).where(steps.c.saga_id.in_(ids))),
                timers=await gone(delete(timers).where(timers.c.saga_id.in_(ids))),
                outbox=await gone(
                    delete(outbox).where(outbox.c.key.in_(ids), outbox.c.sent_at.is_not(None))
                ),
                inbox=await gone(delete(inbox).where(inbox.c.saga_id.in_(ids))),
                sagas=await gone(delete(sagas).where(sagas.c.id.in_(ids))),
            )

    async def close(self) -> None:
        await self.engine.dispose()


def _in_range(column: Column[Any], span: TimeRange | None) -> list[ColumnElement[bool]]:
    """``column`` within ``span`` (its start included, its end not), where given."""
    if span is None:
        return []
    where: list[ColumnElement[bool]] = []
    if span.start is not None:
        where.append(column >= literal(span.start, UTCDateTime))
    if span.end is not None:
        where.append(column < literal(span.end, UTCDateTime))
    return where


def _prunable(before: datetime) -> ColumnElement[bool]:
    """A finished saga, last changed before ``before``, with nothing left to publish."""
    unsent = exists().where(outbox.c.key == sagas.c.id, outbox.c.sent_at.is_(None))
    return sagas.c.status.in_(_FINISHED) & (sagas.c.updated_at < before) & ~unsent


_by_id = attrgetter("message_id")


def _deferred_row(reply: DeferredReply) -> dict[str, Any]:
    return {
        "message_id": reply.message_id,
        "saga_id": reply.saga_id,
        "key": reply.key,
        "body": reply.body,
        "headers": reply.headers,
        "first_seen_at": reply.first_seen_at,
        "attempts": reply.attempts,
        "failures": reply.failures,
        "last_error": reply.last_error,
        "next_attempt_at": reply.next_attempt_at,
    }


def _pending_letters(saga_id: str | None, reason_contains: str | None) -> ColumnElement[bool]:
    """Dead letters not replayed, of ``saga_id`` and with ``reason_contains`` (any
    case, ``%`` and ``_`` taken literally) in their reason, where given."""
    where: list[ColumnElement[bool]] = [dead_letters.c.replayed_at.is_(None)]
    if saga_id is not None:
        where.append(dead_letters.c.saga_id == saga_id)
    if reason_contains is not None:
        where.append(dead_letters.c.reason.icontains(reason_contains, autoescape=True))
    return and_(*where)


def _dead_letter_of(row: Any) -> DeadLetterRecord:
    return DeadLetterRecord(
        id=row.id,
        letter_id=row.letter_id,
        source=row.source,
        reason=row.reason,
        key=row.key,
        body=bytes(row.body),
        headers=dict(row.headers or {}),
        saga_id=row.saga_id,
        received_at=row.received_at,
        replayed_at=row.replayed_at,
        replayed_by=row.replayed_by,
    )


def _summary_fields(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "status": SagaStatus(row.status),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "error": row.error,
        "held": row.held,
        "fingerprint": row.fingerprint,
    }


__all__ = ["SqlSagaStore", "SqlStoreTransaction"]
