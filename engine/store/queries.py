"""The query protocol: what ``sagactl`` and applications read, as views.

Apart from the write side (:mod:`engine.store.base`) so that the engine core, which
only advances sagas, never depends on the read models the client and the CLI show.
One database may serve both; the SQL store does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from engine.states import SagaStatus
from engine.views import (
    DeadLetterRef,
    DeadLetterView,
    RunningDefinition,
    SagaCursor,
    SagaDetail,
    SagaSummary,
    StoreStats,
    TimeRange,
)


@runtime_checkable
class SagaQueries(Protocol):
    """Reads of committed state, each in a short read-only transaction of its own."""

    async def get_saga(self, saga_id: str) -> SagaDetail | None: ...

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
        """Sagas newest first by (created_at, id), the filters given combined (AND):
        of one status, name, version; only held ones; with every business key of
        ``keys``; created and last updated within a time range; strictly after
        ``after`` (the last saga of the page before); whose id starts with
        ``id_prefix``."""
        ...

    async def count_by_status(self) -> dict[SagaStatus, int]: ...

    async def statuses(self, saga_ids: Sequence[str]) -> dict[str, SagaStatus]: ...

    async def list_dead_letters(
        self, *, limit: int = 50, pending_only: bool = False
    ) -> list[DeadLetterView]: ...

    async def pending_dead_letters(
        self,
        *,
        saga_id: str | None = None,
        reason_contains: str | None = None,
        after: int = 0,
        through: int | None = None,
        limit: int = 500,
    ) -> list[DeadLetterRef]:
        """Dead letters not replayed, with an id above ``after`` (and up to ``through``),
        oldest first: of one saga, and whose reason contains a text (any case), if
        given. A page of a bulk replay: ids and sagas only, never the bodies."""
        ...

    async def count_pending_dead_letters(
        self, *, saga_id: str | None = None, reason_contains: str | None = None
    ) -> int:
        """How many dead letters :meth:`pending_dead_letters` would page through."""
        ...

    async def stats(self) -> StoreStats: ...

    async def running_definitions(self, sample: int = 20) -> list[RunningDefinition]:
        """The unfinished sagas (not completed or compensated) by name, version and
        fingerprint, with up to ``sample`` ids of each, oldest first."""
        ...
