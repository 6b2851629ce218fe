"""The application-facing client: start sagas and read their state.

``sagactl`` is built on this class; it never issues SQL of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from sqlalchemy.exc import IntegrityError

from engine.clock import Clock, utc_now
from engine.database import check_schema, create_engine
from engine.definition import Saga
from engine.errors import ConcurrencyConflict, SagaError, SagaNotFoundError, UnknownSagaError
from engine.registry import SagaRegistry
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus
from engine.store.base import SagaStore, write_transition
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.views import DispatchView, OperatorResult, SagaDetail, SagaSummary

#: How often an operator action is re-applied when the engine advanced the saga first.
OPERATOR_CONFLICT_RETRIES = 10


class SagaClient:
    def __init__(
        self,
        store: SagaStore,
        registry: SagaRegistry | None = None,
        *,
        topology: Topology | None = None,
        clock: Clock = utc_now,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry or SagaRegistry()
        self.topology = topology or Topology()
        self.clock = clock
        #: Called after a start committed (the embedded engine wakes its relay).
        self.on_commit = on_commit

    @classmethod
    async def connect(cls, database_url: str, sagas: Iterable[str] = ()) -> SagaClient:
        """A client over an existing, migrated database; clear errors otherwise."""
        registry = SagaRegistry.from_modules(sagas)
        engine = create_engine(database_url, must_exist=True)
        try:
            await check_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(SqlSagaStore(engine), registry)

    async def __aenter__(self) -> SagaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.store.close()

    async def start(self, saga: str | Saga, input: Any, *, saga_id: str | None = None) -> str:
        """Validate the input, then persist the saga and its first command in one
        transaction. Returns the saga id."""
        definition = saga if isinstance(saga, Saga) else self.registry.get(saga)
        parsed = definition.parse_input(input)
        saga_id = saga_id or str(uuid.uuid4())
        now = self.clock()
        state = new_saga(definition, saga_id, parsed.model_dump(mode="json"), now)
        transition = Transition(definition, state, now=now, topology=self.topology)
        transition.start()
        try:
            async with self.store.transaction() as tx:
                await write_transition(tx, state, transition.messages, transition.history, new=True)
        except IntegrityError:
            raise SagaError(f"a saga with id {saga_id!r} already exists") from None
        if self.on_commit is not None:
            self.on_commit()
        return saga_id

    async def get(self, saga_id: str) -> SagaDetail:
        detail = await self.store.get_saga(saga_id)
        if detail is None:
            raise SagaNotFoundError(f"no saga with id {saga_id!r}")
        return detail

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> list[SagaSummary]:
        return await self.store.list_sagas(status=status, name=name, limit=limit)

    # -- operator repair ----------------------------------------------------------

    async def retry(self, saga_id: str, *, actor: str, reason: str | None = None) -> OperatorResult:
        """Resume a parked saga (or end a retry backoff now): the step or compensation
        it stopped at is dispatched again with a fresh attempt budget."""
        return await self._operate(
            saga_id, "retry", actor, reason, lambda t: t.operator_retry(actor, reason)
        )

    async def cancel(
        self, saga_id: str, *, actor: str, reason: str | None = None
    ) -> OperatorResult:
        """Stop a running saga and compensate what ran (the step in flight included)."""
        return await self._operate(
            saga_id, "cancel", actor, reason, lambda t: t.cancel(actor, reason)
        )

    async def _operate(
        self,
        saga_id: str,
        action: str,
        actor: str,
        reason: str | None,
        apply: Callable[[Transition], str],
    ) -> OperatorResult:
        """Apply an operator event in one transaction with its outbox messages, under
        the saga's optimistic row version; re-read and re-decide if the engine won."""
        for _ in range(OPERATOR_CONFLICT_RETRIES):
            try:
                async with self.store.transaction() as tx:
                    state = await tx.load_saga(saga_id)
                    if state is None:
                        raise SagaNotFoundError(f"no saga with id {saga_id!r}")
                    try:
                        definition = self.registry.get(state.name, state.version)
                    except UnknownSagaError as exc:
                        raise UnknownSagaError(
                            f"cannot {action} saga {saga_id}: {exc}; load its module with "
                            "--sagas or SAGA_SAGAS"
                        ) from None
                    previous = state.status
                    transition = Transition(
                        definition, state, now=self.clock(), topology=self.topology
                    )
                    summary = apply(transition)
                    await write_transition(tx, state, transition.messages, transition.history)
            except ConcurrencyConflict:
                continue
            if transition.messages and self.on_commit is not None:
                self.on_commit()
            return OperatorResult(
                saga_id=saga_id,
                action=action,
                actor=actor,
                reason=reason,
                previous_status=previous,
                status=state.status,
                summary=summary,
                dispatched=[
                    DispatchView(
                        destination=m.destination,
                        step=m.envelope.step,
                        kind=m.envelope.kind,
                        name=m.envelope.name,
                        attempt=m.envelope.attempt,
                    )
                    for m in transition.messages
                ],
            )
        raise ConcurrencyConflict(f"saga {saga_id} kept changing under the {action}; try again")

    async def counts(self) -> dict[SagaStatus, int]:
        return await self.store.count_by_status()

    async def statuses(self, saga_ids: Sequence[str]) -> dict[str, SagaStatus]:
        """Status of each given saga (absent ids are left out)."""
        return await self.store.statuses(saga_ids)
