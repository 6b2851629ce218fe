"""The storage protocol the engine core writes through.

The engine never sees SQL: it asks a :class:`StoreTransaction` for saga images and
hands back changed images plus the messages to emit, all inside one transaction. That
one transaction is what makes "advance and emit" atomic.

This is the write side only; what ``sagactl`` and applications read (views of sagas,
stats, dead letters) is the separate query protocol of :mod:`engine.store.queries`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel

from engine.errors import SagaError
from engine.model import HistoryEntry, OutboxMessage, SagaState, Timer


class SagaIdTaken(SagaError):
    """:meth:`StoreTransaction.insert_saga` of an id that another saga has."""


class PruneCounts(BaseModel):
    """Rows of finished sagas that ``sagactl prune`` removed (or, dry, would remove)."""

    sagas: int = 0
    steps: int = 0
    history: int = 0
    timers: int = 0
    #: Sent outbox rows (unsent ones are never removed: their saga is skipped).
    outbox: int = 0
    #: The engine's inbox rows of the sagas' replies.
    inbox: int = 0

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(
            **{
                name: getattr(self, name) + getattr(other, name)
                for name in PruneCounts.model_fields
            }
        )


@dataclass(frozen=True)
class DueTimer:
    saga_id: str
    timer: Timer


@dataclass(frozen=True)
class OutboxRecord:
    id: int
    destination: str
    key: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class DeadLetterRecord:
    """One archived dead letter; ``id`` is 0 until the archive assigned one."""

    letter_id: str
    source: str
    reason: str
    key: str
    body: bytes
    headers: dict[str, str]
    saga_id: str | None
    received_at: datetime
    id: int = 0
    replayed_at: datetime | None = None
    replayed_by: str | None = None


@dataclass(frozen=True)
class DeferredReply:
    """A reply set aside because its saga was not visible when it arrived."""

    message_id: str
    saga_id: str
    #: The delivery as it came (broker key, body, headers), for the dead-letter archive.
    key: str
    body: bytes
    headers: dict[str, str]
    first_seen_at: datetime
    next_attempt_at: datetime
    #: Retries that found the saga still not visible.
    attempts: int = 0
    #: Retries that failed with an error that was not transient, and the last one.
    failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class KeptReply:
    """A reply kept for a saga this engine could not serve (see :mod:`engine.held`)."""

    message_id: str
    saga_id: str
    #: The encoded envelope.
    body: bytes
    held_at: datetime


@dataclass(frozen=True)
class ServedDefinition:
    """One definition a running engine loads, as it registered it (engine/served.py)."""

    engine_id: str
    name: str
    version: int
    fingerprint: str
    last_seen: datetime
    expires_at: datetime


class StoreTransaction(Protocol):
    async def insert_saga(self, state: SagaState) -> None:
        """Write a new saga; raises :class:`SagaIdTaken` if its id is taken."""
        ...

    async def load_saga(self, saga_id: str) -> SagaState | None: ...

    async def lock_sagas(self, saga_ids: Iterable[str]) -> dict[str, SagaState]:
        """Images of the sagas that exist, locked until the end of the transaction
        where the database has row locks (always taken in one order)."""
        ...

    async def save_saga(self, state: SagaState) -> None:
        """Write a changed image; raises ConcurrencyConflict if another writer won."""
        ...

    async def save_sagas(self, states: Sequence[SagaState]) -> None:
        """:meth:`save_saga` for many, in a fixed number of statements."""
        ...

    async def add_outbox(self, messages: Sequence[OutboxMessage]) -> None: ...

    async def add_history(self, saga_id: str, entries: Sequence[HistoryEntry]) -> None: ...

    async def add_histories(self, entries: Sequence[tuple[str, HistoryEntry]]) -> None:
        """History of several sagas, as ``(saga_id, entry)`` pairs."""
        ...

    async def claim_inbox(self, message_id: str, consumer: str, saga_id: str | None = None) -> bool:
        """Record a processed message id (of a reply to ``saga_id``); False if it was
        processed before."""
        ...

    async def claim_inboxes(self, messages: Mapping[str, str | None], consumer: str) -> set[str]:
        """:meth:`claim_inbox` for many (message id -> saga id): the ids that were not
        processed before."""
        ...

    async def due_timers(
        self, now: datetime, limit: int, *, timeouts_due_by: datetime | None = None
    ) -> list[DueTimer]:
        """Due timers, locked for this transaction; other replicas skip them.

        With ``timeouts_due_by``, a timeout (:data:`~engine.model.TIMEOUTS`) counts as
        due only if due by then: held timeouts are not returned at all, so they cannot
        fill the batch and starve the timers behind them."""
        ...

    async def claim_outbox(self, limit: int, *, skip: Collection[str] = ()) -> list[OutboxRecord]:
        """Unsent outbox rows in order, locked for this transaction; none to the
        destinations in ``skip`` (the relay holds them back a while)."""
        ...

    async def mark_sent(self, ids: Sequence[int], at: datetime) -> None: ...

    async def has_unsent(self, saga_id: str, step: str | None = None) -> bool:
        """Whether a message of this saga (of its step ``step``, if given) still waits
        in the outbox for the broker."""
        ...

    async def last_sent(self, saga_id: str, step: str | None = None) -> datetime | None:
        """When the broker took this saga's latest message (of its step ``step``, if
        given); None: none sent, or pruned."""
        ...

    async def saga_exists(self, saga_id: str) -> bool: ...

    async def add_raw_outbox(
        self, destination: str, key: str, body: str, headers: dict[str, str], at: datetime
    ) -> None:
        """Queue a message that is not an envelope of ours (a dead letter's replay)."""
        ...

    async def add_dead_letter(self, letter: DeadLetterRecord) -> int | None:
        """Archive a dead letter; None if its ``letter_id`` is archived already."""
        ...

    async def load_dead_letter(self, letter: int) -> DeadLetterRecord | None: ...

    async def defer_replies(self, replies: Sequence[DeferredReply]) -> None:
        """Set replies aside, in one statement; one already set aside is kept as it was."""
        ...

    async def due_deferred_replies(
        self, now: datetime, limit: int, message_id: str | None = None
    ) -> list[DeferredReply]:
        """Deferred replies due by ``now`` (only ``message_id``'s if given), oldest
        first, locked for this transaction; other replicas skip them."""
        ...

    async def update_deferred_replies(self, replies: Sequence[DeferredReply]) -> None:
        """Write back the attempts, failures and next attempt time of deferred replies."""
        ...

    async def delete_deferred_replies(self, message_ids: Sequence[str]) -> None: ...

    async def mark_replayed(self, letter: int, at: datetime, by: str) -> bool:
        """Mark an archived dead letter replayed; False if it already was."""
        ...

    # -- held sagas (engine/held.py) ------------------------------------------------

    async def hold_sagas(self, reasons: Mapping[str, str], at: datetime) -> None:
        """Hold sagas (id -> why): their timers pause from ``at`` (or from when they
        were first held, if they still are) and no engine advances them."""
        ...

    async def keep_replies(self, replies: Sequence[KeptReply]) -> None:
        """Keep replies for later; one kept already is kept as it was."""
        ...

    async def resumable_sagas(
        self, served: Sequence[tuple[str, int, str]], limit: int
    ) -> list[str]:
        """Ids of sagas held or with kept replies that these (name, version,
        fingerprint) definitions serve, locked for this transaction; other replicas
        skip them."""
        ...

    async def release_sagas(self, saga_ids: Sequence[str], at: datetime) -> dict[str, datetime]:
        """End the hold of these sagas: their timers move on by the time they were held.
        Returns when each one that was held had been held."""
        ...

    async def kept_replies(self, saga_ids: Sequence[str]) -> list[KeptReply]:
        """The replies kept for these sagas, oldest first."""
        ...

    async def delete_kept_replies(self, message_ids: Sequence[str]) -> None: ...


class SagaStore(Protocol):
    """Transactions, retention and the connections behind them (the write side)."""

    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]: ...

    def outbox_signal(self) -> OutboxSignal | None:
        """A new cross-process outbox signal over this store's database, if it has
        such a mechanism (PostgreSQL: LISTEN / NOTIFY); None otherwise (SQLite)."""
        ...

    # -- retention: every prune is one short transaction; replicas may run it at once.

    async def prune_sent_outbox(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` outbox rows the broker confirmed before ``before``;
        returns how many. Unsent rows are never touched."""
        ...

    async def prune_inbox(self, before: datetime, limit: int) -> int:
        """Delete up to ``limit`` inbox rows processed before ``before``."""
        ...

    async def count_finished(self, before: datetime) -> PruneCounts:
        """What :meth:`prune_finished` would remove, all batches together."""
        ...

    async def prune_finished(self, before: datetime, limit: int) -> PruneCounts:
        """Delete up to ``limit`` finished sagas (completed or compensated) last changed
        before ``before``, with their steps, history, timers, sent outbox rows and inbox
        rows. A saga with an unsent outbox row, or locked by another writer, is left
        for later."""
        ...

    # -- what the running engines serve (engine/served.py) ---------------------------

    async def register(
        self,
        engine_id: str,
        definitions: Sequence[tuple[str, int, str]],
        *,
        started_at: datetime,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        """Write (or refresh) the definitions an engine serves, until ``expires_at``;
        forget registrations expired long ago."""
        ...

    async def deregister(self, engine_id: str) -> None:
        """Delete an engine's registration."""
        ...

    async def live_definitions(self, now: datetime) -> list[ServedDefinition]:
        """The definitions the engines serve whose registration has not expired."""
        ...

    async def close(self) -> None: ...


class OutboxSignal(Protocol):
    """Wakes outbox relays in other processes when new outbox rows commit.

    A process with its own relay wakes it directly after a commit; a process without
    one (an application starting sagas, ``sagactl``) announces its rows through this
    seam instead, so a relay elsewhere publishes them without waiting for its poll.
    The announcement is only a hint: it carries no rows, and relays keep polling as
    a fallback. Stores without such a mechanism (SQLite) have no signal.
    """

    async def announce(self, tx: StoreTransaction) -> None:
        """Inside ``tx``: listening relays are woken once it commits, never if it
        rolls back (so a relay never looks for rows that are not visible yet)."""
        ...

    async def listen(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call ``wake`` for every announcement (and after every (re)connect, for
        what was announced while disconnected) until ``stop`` is set; survives
        connection loss by reconnecting with backoff."""
        ...


async def write_transition(
    tx: StoreTransaction,
    state: SagaState,
    messages: Sequence[OutboxMessage],
    entries: Sequence[HistoryEntry],
    *,
    new: bool = False,
) -> None:
    """Persist a changed saga with what the change emits: the outbox half of atomicity."""
    if new:
        await tx.insert_saga(state)
    else:
        await tx.save_saga(state)
    await tx.add_outbox(messages)
    await tx.add_history(state.id, entries)


async def write_transitions(
    tx: StoreTransaction,
    changed: Sequence[tuple[SagaState, Sequence[OutboxMessage], Sequence[HistoryEntry]]],
) -> None:
    """:func:`write_transition` for several sagas at once: a batch of replies costs the
    database a few statements, not a few per reply."""
    await tx.save_sagas([state for state, _, _ in changed])
    await tx.add_outbox([m for _, messages, _ in changed for m in messages])
    await tx.add_histories([(state.id, e) for state, _, entries in changed for e in entries])
