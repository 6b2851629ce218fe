"""The barrier protocol the worker runner is written against.

The runner decides when to handle, commit, reply and acknowledge; the barrier decides
whether a command's handler runs at all (once per step and direction, whatever the
deliveries) and keeps each outcome beside the participant's own writes, in the
participant's transaction. Its SQL implementation is :mod:`engine.worker.barrier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from engine.limits import DEFAULT_LIMITS, Limits
from engine.messages import Envelope
from engine.worker.worker import Registration


@dataclass(frozen=True)
class Recorded:
    """An outcome the barrier recorded: which message (``origin``: action or
    compensation) wrote it, and the reply it gave."""

    origin: str
    outcome: str
    reply: dict[str, Any] | None
    error: str | None


#: Recorded outcomes by (saga, step, op), op being "action" or "compensation".
Outcomes = dict[tuple[str, str, str], Recorded]


class ConcurrentDuplicate(Exception):
    """Another copy of a command committed its outcome first; this transaction rolled
    back. Handled again later, the command finds that outcome and re-sends it."""


class BarrierTransaction(Protocol):
    """One participant transaction: handlers' writes and the outcomes, committed together."""

    @property
    def began(self) -> float | None:
        """When (``time.monotonic``) the database transaction began on a connection,
        None while it has not; on a one-writer database, when it took the write lock."""
        ...

    async def handle(self, registration: Registration, envelope: Envelope) -> Envelope:
        """The reply to ``envelope``: its handler run behind the barrier, or the
        outcome recorded for it before (a duplicate, a compensation with no action, an
        action after its compensation).

        A handler that raises has its own writes undone (a savepoint) and records no
        outcome; its exception propagates, and the transaction goes on unless
        :meth:`intact` says otherwise."""
        ...

    async def intact(self) -> bool:
        """Whether the transaction can still handle commands and commit after one
        raised: False when that command's writes could not be undone alone (its
        savepoint did not roll back, the connection was lost), and the whole
        transaction must roll back."""
        ...


class Barrier(Protocol):
    """A participant's exactly-once effects over at-least-once deliveries."""

    #: Whether an open transaction holds up every other writer of the database
    #: (SQLite): the runner then handles each command in a transaction of its own, with
    #: the outcomes read ahead, so the transaction begins at a handler's first write.
    one_writer: bool

    async def recorded(self, participant: str, envelopes: Sequence[Envelope]) -> Outcomes:
        """``participant``'s outcomes of ``envelopes``' sagas, read outside any write
        transaction (one query)."""
        ...

    def transaction(
        self,
        participant: str,
        envelopes: Sequence[Envelope],
        *,
        known: Outcomes | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> AbstractAsyncContextManager[BarrierTransaction]:
        """A transaction to handle ``envelopes`` in, in order; committed on a clean exit
        with the outcomes it recorded, else rolled back. ``known``: outcomes read ahead
        (:meth:`recorded`), then not read again, and extended with this transaction's
        once it committed. Raises :class:`ConcurrentDuplicate` when a concurrent copy of
        a command won. A reply over ``limits`` is recorded as the failure it becomes."""
        ...

    async def prune(self, participant: str, before: datetime, limit: int) -> int:
        """Delete up to about ``limit`` of ``participant``'s outcomes older than
        ``before`` (a step's together); returns how many."""
        ...
