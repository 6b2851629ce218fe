"""The application-facing client: start sagas and read their state.

``sagactl`` is built on this class; it never issues SQL of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine._aio import Closing
from engine.clock import Clock, utc_now
from engine.deadletters import describe, replay_headers
from engine.definition import Saga
from engine.errors import (
    ConcurrencyConflict,
    DeadLetterNotFoundError,
    DecodeError,
    LimitError,
    OperationRefused,
    SagaError,
    SagaNotFoundError,
    UnknownSagaError,
)
from engine.limits import (
    ANY_SIZE,
    DEFAULT_LIMITS,
    Limits,
    check_actor,
    check_key,
    check_name,
    check_reason,
    check_saga_id,
    nul_path,
)
from engine.messages import Envelope, MessageKind, decode
from engine.model import Awaiting, HistoryEntry, TimerKind
from engine.registry import SagaRegistry
from engine.retention import PRUNE_BATCH
from engine.served import describe_served, loaded_versions, served_versions
from engine.settings import Settings, load_settings
from engine.signing import as_replayed
from engine.states import SagaStatus
from engine.store.base import OutboxSignal, SagaStore, ServedDefinition, StoreTransaction
from engine.store.queries import SagaQueries
from engine.topology import Topology
from engine.views import (
    AwaitKind,
    AwaitView,
    BulkReplayResult,
    CheckedDefinition,
    CheckView,
    DeadLetterRef,
    DeadLetterStats,
    DeadLetterView,
    DispatchView,
    LetterReplay,
    OldestRunning,
    OperatorResult,
    OutboxStats,
    PendingWork,
    PruneCounts,
    PruneResult,
    ReplayResult,
    SagaCursor,
    SagaDetail,
    SagaPage,
    SagaSummary,
    StatsView,
    TimeRange,
    dead_letter_view,
)

if TYPE_CHECKING:
    from engine.advance import Advancer, OperatorAction
    from engine.connections import Connections

# The write path (engine.advance: the state machine, tracing) is imported by the
# methods that write, so reading sagas (``sagactl list``) starts without it.

#: Dead letters a bulk replay reads at a time (ids only; each replays on its own).
REPLAY_BATCH = 200

#: How often an operator action is re-applied when the engine advanced the saga first.
OPERATOR_CONFLICT_RETRIES = 10
#: How long a client trusts what it read of the engines' registrations (seconds).
SERVED_TTL = 1.0
#: The fewest characters of a saga id that :meth:`SagaClient.resolve` takes as a
#: short id (as git takes abbreviated hashes): fewer would too easily be ambiguous.
SHORT_ID_MIN = 4


class SagaClient(Closing):
    """Starts sagas, reads their state, and repairs them as an operator would.

    What it writes goes into the database only (a saga, its first command in the
    outbox): an engine daemon's relay publishes it. So the client must agree with the
    engine on the database and the topic prefix, and :meth:`connect` takes both, like
    every other setting, from the same ``SAGA_*`` environment as ``sagactl``::

        async with await SagaClient.connect() as client:  # SAGA_DATABASE_URL, ...
            saga_id = await client.start("place_order", {...})
            print((await client.get(saga_id)).status)

    The constructor is the low-level way in, over a store one built oneself.
    """

    def __init__(
        self,
        store: SagaStore,
        registry: SagaRegistry | None = None,
        *,
        topology: Topology | None = None,
        clock: Clock = utc_now,
        on_commit: Callable[[], None] | None = None,
        messaging_system: str = "memory",
        outbox_signal: OutboxSignal | None = None,
        limits: Limits = DEFAULT_LIMITS,
        queries: SagaQueries | None = None,
        start_versions: Mapping[str, int] | None = None,
    ) -> None:
        """A client over ``store``, serving the sagas of ``registry``.

        It writes through ``store`` and reads through ``queries``, by default the
        store itself when it answers queries too (the SQL store does).

        ``topology`` names the destinations commands go to (its prefix must be the
        workers'); ``on_commit`` is called after each commit that wrote outbox rows
        (an in-process engine wakes its relay); ``outbox_signal`` wakes relays in other
        processes (by default the store's own: PostgreSQL ``NOTIFY``);
        ``start_versions`` the version :meth:`start` picks per saga name
        (``SAGA_START_VERSIONS``).
        """
        self.store = store
        if queries is None:
            if not isinstance(store, SagaQueries):
                raise TypeError(f"{type(store).__name__} answers no queries: pass queries=")
            queries = store
        #: What :meth:`get`, :meth:`list`, :meth:`stats` ... read through.
        self.queries: SagaQueries = queries
        self.registry = registry or SagaRegistry()
        self.topology = topology or Topology()
        self.clock = clock
        #: Called after a start committed (the embedded engine wakes its relay).
        self.on_commit = on_commit
        #: Wakes relays in other processes when this client's outbox rows commit
        #: (PostgreSQL: NOTIFY); by default the store's own, if its database has one.
        self.outbox_signal = outbox_signal if outbox_signal is not None else store.outbox_signal()
        #: ``messaging.system`` of the broker the relay will publish to (trace attribute).
        self.messaging_system = messaging_system
        #: Sizes a start refuses beyond (the first command), and the operator's
        #: retries build commands within.
        self.limits = limits
        #: Saga name -> the version :meth:`start` starts (else the newest served).
        self.start_versions = dict(start_versions or {})
        #: What the running engines serve, as last read, and until when to trust it.
        self._served: tuple[float, list[ServedDefinition]] | None = None

    @classmethod
    async def connect(
        cls,
        database_url: str | None = None,
        sagas: Iterable[str | Saga] | None = None,
        *,
        settings: Settings | None = None,
        topology: Topology | None = None,
        messaging_system: str | None = None,
        limits: Limits | None = None,
    ) -> SagaClient:
        """A client over an existing, migrated database; clear errors otherwise.

        Every argument left out comes from ``settings``, by default this process's
        ``SAGA_*`` environment (and ``SAGA_<NAME>_FILE`` files), as for ``sagactl``:
        the database (``SAGA_DATABASE_URL``), the saga modules (``SAGA_SAGAS``), the
        destinations' prefix (``SAGA_TOPIC_PREFIX``), the broker's kind for traces
        (``SAGA_BROKER_URL``) and the limits (``SAGA_MAX_MESSAGE_BYTES``). A bad
        setting is a :class:`~engine.errors.ConfigError` naming the variable.
        """
        if settings is None:
            settings = load_settings()
        if database_url is not None:
            settings = settings.model_copy(update={"database_url": database_url})
        # Imported here: the client's module stays free of drivers and adapters.
        from engine.connections import Connections

        connections = Connections(settings, must_exist=True, topology=topology, limits=limits)
        try:
            registry = connections.registry(sagas)
            await connections.check_schema()
        except BaseException:
            await connections.close()
            raise
        client = cls.over(connections, registry)
        if messaging_system is not None:
            client.messaging_system = messaging_system
        return client

    @classmethod
    def over(
        cls,
        connections: Connections,
        registry: SagaRegistry,
        *,
        on_commit: Callable[[], None] | None = None,
    ) -> SagaClient:
        """A client on the database, prefix, limits and outbox signal of
        ``connections`` (what :meth:`connect` and :meth:`Wiring.client
        <engine.wiring.Wiring.client>` return); closing it closes that database."""
        return cls(
            connections.store,
            registry,
            topology=connections.topology,
            on_commit=on_commit,
            messaging_system=connections.messaging_system,
            outbox_signal=connections.signal,
            limits=connections.limits,
            start_versions=connections.settings.start_version_map,
        )

    async def close(self) -> None:
        """Close the store (its database connections)."""
        await self.store.close()

    async def start(
        self,
        saga: str | Saga,
        input: Any,
        *,
        saga_id: str | None = None,
        version: int | None = None,
    ) -> str:
        """Validate the input, then persist the saga and its first command in one
        transaction. Returns the saga id.

        Saga ``saga`` starts at ``version``, else at the one :attr:`start_versions`
        names, else at the newest version a running engine serves (see
        :meth:`definition`).

        Refused before anything is stored: a version no running engine serves (when
        engines registered), an id the columns cannot take, an input holding a NUL,
        an input whose first command is over the limits.
        """
        if isinstance(saga, Saga):
            definition = saga
            self._check_served(definition, await self._live())
        else:
            definition = await self.definition(saga, version)
        if saga_id is not None:
            check_saga_id(saga_id)
        parsed = definition.parse_input(input)
        data = parsed.model_dump(mode="json")
        size = len(parsed.model_dump_json())
        if size > self.limits.max_message_bytes:
            raise LimitError(
                f"input too large: it is {size:,} bytes as JSON, the limit is "
                f"{self.limits.max_message_bytes:,} (SAGA_MAX_MESSAGE_BYTES)"
            )
        where = nul_path(data)
        if where is not None:
            raise LimitError(
                f"input refused: {where} holds a NUL character, which PostgreSQL text cannot store"
            )
        saga_id = saga_id or str(uuid.uuid4())
        await self._advancer().start(self.store, definition, saga_id, data)
        return saga_id

    async def definition(self, name: str, version: int | None = None) -> Saga:
        """The definition :meth:`start` starts saga ``name`` with: at ``version`` (or
        the one :attr:`start_versions` names), else the newest version some running
        engine serves as this process defines it; with no engine registered (embedded,
        tests), the newest this process loads. An UnknownSagaError naming what the
        engines serve otherwise."""
        if version is None:
            version = self.start_versions.get(name)
        live = await self._live()
        if version is not None:
            definition = self.registry.get(name, version)
            self._check_served(definition, live)
            return definition
        if not live:
            return self.registry.get(name)
        choices = served_versions(live, self.registry, name)
        if not choices:
            self.registry.get(name)  # a name this process does not load: its error
            raise UnknownSagaError(
                f"cannot start saga {name!r}: {describe_served(live, name)}, and this "
                f"process loads {loaded_versions(self.registry, name)} "
                f"({self._fingerprints(name)})"
            )
        return choices[-1]

    def _fingerprints(self, name: str) -> str:
        return ", ".join(
            f"v{s.version} fingerprint {s.fingerprint}" for s in self.registry.versions(name)
        )

    def _check_served(self, definition: Saga, live: builtins.list[ServedDefinition]) -> None:
        """Refuse a definition no running engine serves, if any engine registered."""
        wanted = (definition.name, definition.version, definition.fingerprint)
        if not live or wanted in {(d.name, d.version, d.fingerprint) for d in live}:
            return
        raise UnknownSagaError(
            f"cannot start saga {definition.name!r} v{definition.version} (fingerprint "
            f"{definition.fingerprint}): {describe_served(live, definition.name)}"
        )

    async def _live(self) -> builtins.list[ServedDefinition]:
        """What the running engines serve, read at most every :data:`SERVED_TTL`."""
        cached = self._served
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return cached[1]
        live = await self.store.live_definitions(utc_now())
        self._served = (now + SERVED_TTL, live)
        return live

    def _advancer(self) -> Advancer:
        """What advances sagas for this client, as it is configured now."""
        from engine.advance import Advancer

        return Advancer(
            self.registry,
            topology=self.topology,
            clock=self.clock,
            limits=self.limits,
            messaging_system=self.messaging_system,
            wake=self.on_commit,
            signal=self.outbox_signal,
        )

    async def _announce(self, tx: StoreTransaction) -> None:
        """Inside a transaction that wrote outbox rows: wake the relays on commit."""
        if self.outbox_signal is not None:
            await self.outbox_signal.announce(tx)

    async def get(self, saga_id: str) -> SagaDetail:
        """One saga with its steps, its history and what it awaits now (each step's
        reply, signal or retry, until when, and whether its message is still unsent);
        SagaNotFoundError if there is none."""
        detail = await self._detail(saga_id)
        if detail.status.is_terminal or detail.status is SagaStatus.PARKED:
            return detail  # nothing in flight: parking clears the waits and timers
        work = await self.queries.pending_work(saga_id)
        return detail.model_copy(update={"awaits": _awaits(detail, work)})

    async def _detail(self, saga_id: str) -> SagaDetail:
        """The saga as stored, without what it awaits (which only :meth:`get` reads)."""
        detail = await self.queries.get_saga(saga_id)
        if detail is None:
            raise SagaNotFoundError(f"no saga with id {saga_id!r}")
        return detail

    async def resolve(self, saga_id: str) -> str:
        """The saga id that ``saga_id`` stands for: itself if a saga has it, else the
        one id it begins (a short id, as ``sagactl list`` shows: at least
        :data:`SHORT_ID_MIN` characters). SagaNotFoundError if none or several do."""
        check_saga_id(saga_id)
        if await self.queries.statuses([saga_id]):
            return saga_id
        if len(saga_id) >= SHORT_ID_MIN:
            sagas = await self.queries.list_sagas(id_prefix=saga_id, limit=3)
            found = sorted(s.id for s in sagas)
            if len(found) == 1:
                return found[0]
            if found:
                more = ", ..." if len(found) > 2 else ""
                raise SagaNotFoundError(
                    f"{saga_id!r} is the start of several saga ids ({', '.join(found[:2])}"
                    f"{more}): give more of it"
                )
        raise SagaNotFoundError(f"no saga with id {saga_id!r}")

    async def wait(
        self, saga_id: str, *, timeout: float = 30.0, interval: float = 0.05
    ) -> SagaDetail:
        """The saga once nothing more happens to it by itself: completed, compensated,
        or parked (an operator must look). Read every ``interval`` seconds; a
        :class:`TimeoutError` naming the saga and its last status after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # What it awaits is not read while it moves: settled, it awaits nothing.
            detail = await self._detail(saga_id)
            if detail.status.is_terminal or detail.status is SagaStatus.PARKED:
                return detail
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"saga {saga_id!r} is still {detail.status.value} after {timeout:g}s"
                )
            await asyncio.sleep(min(interval, left))

    async def follow(self, saga_id: str, *, interval: float = 0.5) -> AsyncIterator[SagaDetail]:
        """The saga as it goes: read every ``interval`` seconds, yielded first as it
        is, then each time its status or history changed; ends after yielding it
        completed, compensated or parked (as :meth:`wait` does). Read as :meth:`wait`
        reads it, without what it awaits (``awaits`` empty: :meth:`get` reads that),
        so a poll is one saga's rows, not also its timers and outbox. SagaNotFoundError
        if there is no such saga (or it was pruned meanwhile)."""
        seen: tuple[SagaStatus, int] | None = None
        while True:
            detail = await self._detail(saga_id)
            now = (detail.status, len(detail.history))
            if now != seen:
                seen = now
                yield detail
            if detail.status.is_terminal or detail.status is SagaStatus.PARKED:
                return
            await asyncio.sleep(interval)

    async def list(
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
        after: SagaCursor | str | None = None,
        id_prefix: str | None = None,
    ) -> list[SagaSummary]:
        """Sagas, newest first, the filters given combined: one status, one definition
        name and version; with ``held``, only sagas held for want of an engine that
        serves them; with every business key of ``keys`` (name -> value); created or
        last updated within a :class:`~engine.views.TimeRange`; after a cursor (a
        saga's :attr:`~engine.views.SagaSummary.cursor`, the last of the page before);
        whose id starts with ``id_prefix``.
        :meth:`page` also says whether more follow. A cursor text that is not one
        raises ValueError; a key value no saga can have, LimitError."""
        return await self.queries.list_sagas(
            status=status,
            name=name,
            limit=limit,
            version=version,
            held=held,
            keys=_checked_keys(keys),
            created=created,
            updated=updated,
            after=SagaCursor.decode(after) if isinstance(after, str) else after,
            id_prefix=_checked_prefix(id_prefix),
        )

    async def page(
        self,
        *,
        limit: int = 50,
        after: SagaCursor | str | None = None,
        status: SagaStatus | None = None,
        name: str | None = None,
        version: int | None = None,
        held: bool = False,
        keys: Mapping[str, str] | None = None,
        created: TimeRange | None = None,
        updated: TimeRange | None = None,
        id_prefix: str | None = None,
    ) -> SagaPage:
        """A page of :meth:`list` and the cursor of the next one (None: no more)."""
        found = await self.list(
            id_prefix=id_prefix,
            status=status,
            name=name,
            limit=limit + 1,
            version=version,
            held=held,
            keys=keys,
            created=created,
            updated=updated,
            after=after,
        )
        more = len(found) > limit
        sagas = found[:limit]
        return SagaPage(sagas=sagas, next=sagas[-1].cursor if more else None)

    async def find(self, limit: int = 50, **keys: str) -> builtins.list[SagaSummary]:
        """The sagas with every one of these business keys, newest first:
        ``await client.find(order_id="4711")``. (A key named ``limit`` is searched
        with ``list(keys=...)``.)"""
        if not keys:
            raise ValueError("find needs at least one business key, e.g. find(order_id='4711')")
        return await self.list(keys=keys, limit=limit)

    # -- operator repair ----------------------------------------------------------

    async def retry(self, saga_id: str, *, actor: str, reason: str | None = None) -> OperatorResult:
        """Resume a parked saga (or end a retry backoff now): the step or compensation
        it stopped at is dispatched again with a fresh attempt budget."""
        from engine.advance import Retried

        return await self._operate(saga_id, Retried(actor, reason))

    async def cancel(
        self, saga_id: str, *, actor: str, reason: str | None = None
    ) -> OperatorResult:
        """Stop a running saga and compensate what ran (the step in flight included)."""
        from engine.advance import Cancelled

        return await self._operate(saga_id, Cancelled(actor, reason))

    async def signal(
        self,
        saga_id: str,
        event: str,
        payload: BaseModel | Mapping[str, Any] | None = None,
        *,
        actor: str = "application",
    ) -> OperatorResult:
        """Send the application's event ``event`` (an approval, a provider's webhook)
        to a saga: it completes the :class:`~engine.definition.WaitFor` step waiting
        for it, its payload the step's reply; one the saga has not reached yet is
        kept for it. Refused (:class:`OperationRefused`) if the saga waits for no
        such event, has had it already, or is no longer running."""
        from engine.advance import Signalled

        check_name(event, "the event name")
        data = (
            payload.model_dump(mode="json")
            if isinstance(payload, BaseModel)
            else dict(payload or {})
        )
        size = len(json.dumps(data, separators=(",", ":")))
        if size > self.limits.max_message_bytes:
            raise LimitError(
                f"signal payload too large: it is {size:,} bytes as JSON, the limit is "
                f"{self.limits.max_message_bytes:,} (SAGA_MAX_MESSAGE_BYTES)"
            )
        where = nul_path(data)
        if where is not None:
            raise LimitError(f"signal payload refused: {where} holds a NUL character")
        return await self._operate(saga_id, Signalled(actor, event=event, payload=data))

    async def _operate(self, saga_id: str, event: OperatorAction) -> OperatorResult:
        """Apply an operator event in one transaction with its outbox messages, under
        the saga's optimistic row version; re-read and re-decide if the engine won.

        Refused before anything is read: an actor or reason the CLI would refuse."""
        check_actor(event.actor)
        check_reason(event.reason)
        advancer = self._advancer()
        for _ in range(OPERATOR_CONFLICT_RETRIES):
            try:
                done = await advancer.operate(self.store, saga_id, event)
            except ConcurrencyConflict:
                continue
            return OperatorResult(
                saga_id=saga_id,
                action=event.action,
                actor=event.actor,
                reason=event.reason,
                previous_status=done.previous,
                status=done.state.status,
                summary=done.summary,
                dispatched=[
                    DispatchView(
                        destination=m.destination,
                        step=m.envelope.step,
                        kind=m.envelope.kind,
                        name=m.envelope.name,
                        attempt=m.envelope.attempt,
                    )
                    for m in done.messages
                ],
            )
        raise ConcurrencyConflict(
            f"saga {saga_id} kept changing under the {event.action}; try again"
        )

    # -- dead letters ---------------------------------------------------------------

    async def dead_letters(
        self, *, limit: int = 50, pending_only: bool = False
    ) -> builtins.list[DeadLetterView]:
        """Archived dead letters, newest first."""
        return await self.queries.list_dead_letters(limit=limit, pending_only=pending_only)

    async def dead_letter(self, letter: int) -> DeadLetterView:
        """One archived dead letter with its body; DeadLetterNotFoundError if none."""
        async with self.store.transaction() as tx:
            record = await tx.load_dead_letter(letter)
        if record is None:
            raise DeadLetterNotFoundError(f"no dead letter with id {letter}")
        return dead_letter_view(record)

    async def replay_dead_letter(
        self,
        letter: int,
        *,
        actor: str,
        reason: str | None = None,
        force: bool = False,
        re_sign: bool = False,
        dry_run: bool = False,
    ) -> ReplayResult:
        """Send an archived dead letter back to its source destination, through the
        outbox (the relay publishes it), and mark it replayed: all in one transaction.
        With ``dry_run``, only check that it would be (the same refusals), write nothing.

        It goes as it was archived, with its own signature or none: a consumer that
        refused it as unsigned or forged refuses it again. With ``re_sign`` the
        engine's relay signs it afresh: the operator vouches for it (for a message
        refused during a rollout, or signed with a key since dropped).

        Refused when it was replayed before, when its body cannot travel as outbox
        text, and (unless ``force``) when its saga no longer waits for it: a stale
        command would run an action nothing compensates any more; and an actor or
        reason the CLI would refuse.
        """
        check_actor(actor)
        check_reason(reason)
        now = self.clock()
        async with self.store.transaction() as tx:
            record = await tx.load_dead_letter(letter)
            if record is None:
                raise DeadLetterNotFoundError(f"no dead letter with id {letter}")
            if record.replayed_at is not None:
                raise OperationRefused(
                    f"dead letter {letter} was already replayed at "
                    f"{record.replayed_at.isoformat(timespec='seconds')} by {record.replayed_by}"
                )
            if not record.source:
                raise OperationRefused(
                    f"dead letter {letter} has no source destination to be replayed to"
                )
            try:
                body = record.body.decode("utf-8")
            except UnicodeDecodeError:
                body = "\x00"
            if "\x00" in body:
                raise OperationRefused(
                    f"dead letter {letter} cannot be replayed: its body is not text "
                    "(it is binary or holds NUL bytes)"
                )
            try:
                envelope: Envelope | None = decode(record.body, ANY_SIZE)
            except DecodeError:
                envelope = None
            saga = await tx.load_saga(envelope.saga_id) if envelope is not None else None
            if envelope is not None and saga is not None and not force:
                _check_awaited(letter, envelope, saga.tokens(), saga.status)
            if dry_run:
                return ReplayResult(
                    dead_letter=dead_letter_view(record),
                    destination=record.source,
                    actor=actor,
                    reason=reason,
                    saga_id=saga.id if saga is not None else None,
                )
            headers = as_replayed(replay_headers(record.headers), letter, re_sign=re_sign)
            await tx.add_raw_outbox(record.source, record.key, body, headers, now)
            if not await tx.mark_replayed(letter, now, actor):
                raise OperationRefused(f"dead letter {letter} was replayed concurrently")
            await self._announce(tx)
            if envelope is not None and saga is not None:
                why = f"reason: {reason}" if reason else "no reason given"
                detail = (
                    f"{why}; dead letter #{letter} ({describe(envelope)}) sent back to "
                    f"{record.source}" + (", re-signed by the engine" if re_sign else "")
                )
                entry = HistoryEntry(now, "dead_letter_replayed", envelope.step, detail, actor)
                await tx.add_history(saga.id, [entry])
        if self.on_commit is not None:
            self.on_commit()
        replayed = dead_letter_view(replace(record, replayed_at=now, replayed_by=actor))
        return ReplayResult(
            dead_letter=replayed,
            destination=record.source,
            actor=actor,
            reason=reason,
            saga_id=saga.id if saga is not None else None,
        )

    async def replay_dead_letters(
        self,
        saga_id: str | None = None,
        reason_contains: str | None = None,
        limit: int | None = None,
        *,
        actor: str,
        reason: str | None = None,
        force: bool = False,
        re_sign: bool = False,
        dry_run: bool = False,
        batch: int = REPLAY_BATCH,
        progress: Callable[[int], None] | None = None,
    ) -> BulkReplayResult:
        """Replay every dead letter not replayed yet, oldest first: those of saga
        ``saga_id`` and whose reason contains ``reason_contains`` (any case), where
        given; all of them if neither is; at most ``limit``.

        Each goes through :meth:`replay_dead_letter` in a transaction of its own, with
        the same checks: one it refuses (its saga no longer waits for it, its body is
        not text, ...) is reported in the result with the refusal's words, and the
        others still go. ``actor``, ``reason``, ``force``, ``re_sign`` and ``dry_run``
        are the single replay's. Only letters archived when it starts are looked at
        (one dead-lettered again meanwhile waits for the next run). They are read
        ``batch`` at a time (ids only), so any number can be replayed; ``progress`` is
        called with how many were done.
        """
        check_actor(actor)
        check_reason(reason)
        if saga_id is not None:
            check_saga_id(saga_id)
        check_reason(reason_contains, "the text to find in reasons")
        if batch < 1:
            raise SagaError("the replay batch must hold at least one dead letter")
        if limit is not None and limit < 1:
            raise SagaError("the most dead letters to replay must be at least 1")
        done: builtins.list[LetterReplay] = []
        # Only letters archived before the run: a replay that is dead-lettered again
        # while it goes on is a new letter, which this run must not replay in a loop.
        newest = await self.queries.list_dead_letters(limit=1)
        through, after = (newest[0].id if newest else 0), 0
        while limit is None or len(done) < limit:
            page = await self.queries.pending_dead_letters(
                saga_id=saga_id,
                reason_contains=reason_contains,
                after=after,
                through=through,
                limit=batch if limit is None else min(batch, limit - len(done)),
            )
            if not page:
                break
            for ref in page:
                done.append(
                    await self._replay_one(
                        ref,
                        actor=actor,
                        reason=reason,
                        force=force,
                        re_sign=re_sign,
                        dry_run=dry_run,
                    )
                )
                if progress is not None:
                    progress(len(done))
            after = page[-1].id
        return BulkReplayResult(
            dry_run=dry_run,
            saga_id=saga_id,
            reason_contains=reason_contains,
            actor=actor,
            reason=reason,
            letters=done,
        )

    async def _replay_one(self, ref: DeadLetterRef, **options: Any) -> LetterReplay:
        """One letter of a bulk replay; a refusal is its outcome, not an error."""
        try:
            result = await self.replay_dead_letter(ref.id, **options)
        except (OperationRefused, DeadLetterNotFoundError) as exc:
            return LetterReplay(
                id=ref.id,
                saga_id=ref.saga_id,
                source=ref.source,
                outcome="refused",
                refusal=str(exc),
            )
        letter = result.dead_letter
        return LetterReplay(
            id=ref.id,
            saga_id=ref.saga_id,
            source=ref.source,
            outcome="would replay" if options.get("dry_run") else "replayed",
            message=(
                f"{letter.kind} {letter.name} (attempt {letter.attempt})" if letter.kind else None
            ),
        )

    async def count_dead_letters(
        self, saga_id: str | None = None, reason_contains: str | None = None
    ) -> int:
        """How many dead letters :meth:`replay_dead_letters` would look at."""
        return await self.queries.count_pending_dead_letters(
            saga_id=saga_id, reason_contains=reason_contains
        )

    # -- stats ------------------------------------------------------------------------

    async def stats(self) -> StatsView:
        """Counts by state and saga, the oldest saga in progress, the outbox backlog
        and the dead letters not replayed."""
        raw = await self.queries.stats()
        now = self.clock()
        by_status = dict.fromkeys(SagaStatus, 0)
        by_saga: dict[str, dict[SagaStatus, int]] = {}
        for row in raw.counts:
            by_status[row.status] += row.count
            by_saga.setdefault(row.name, {})[row.status] = row.count
        oldest = raw.oldest_running
        return StatsView(
            at=now,
            total=sum(by_status.values()),
            by_status=by_status,
            by_saga=by_saga,
            oldest_running=OldestRunning(
                id=oldest.id,
                name=oldest.name,
                status=oldest.status,
                created_at=oldest.created_at,
                age_seconds=max(0.0, (now - oldest.created_at).total_seconds()),
            )
            if oldest is not None
            else None,
            outbox=OutboxStats(
                unsent=raw.outbox_unsent,
                oldest_unsent_age_seconds=max(
                    0.0, (now - raw.outbox_oldest_unsent_at).total_seconds()
                )
                if raw.outbox_oldest_unsent_at is not None
                else None,
            ),
            dead_letters=DeadLetterStats(
                not_replayed=raw.dead_letters_pending, total=raw.dead_letters_total
            ),
            replies_deferred=raw.replies_deferred,
            held=raw.held,
        )

    # -- retention --------------------------------------------------------------------

    async def prune(
        self,
        older_than: timedelta,
        *,
        dry_run: bool = False,
        batch: int = PRUNE_BATCH,
        progress: Callable[[PruneCounts], None] | None = None,
    ) -> PruneResult:
        """Remove finished sagas (completed or compensated) last changed more than
        ``older_than`` ago, with their steps, history, timers, sent outbox rows and
        inbox rows; ``dry_run`` only counts them. Running, compensating and parked
        sagas are never removed, nor one with a message still waiting in the outbox.

        Works in transactions of ``batch`` sagas, calling ``progress`` with the running
        totals after each. A late duplicate reply to a removed saga is dead-lettered as
        a reply for no saga (after the engine's patience for an unknown saga).
        """
        if older_than < timedelta(0):
            raise SagaError("the age of sagas to prune must not be negative")
        if batch < 1:
            raise SagaError("the prune batch must hold at least one saga")
        cutoff = self.clock() - older_than
        if dry_run:
            counts = await self.store.count_finished(cutoff)
            return PruneResult(
                dry_run=True,
                older_than_seconds=older_than.total_seconds(),
                cutoff=cutoff,
                batches=0,
                rows=counts,
            )
        total = PruneCounts()
        batches = 0
        while True:
            removed = await self.store.prune_finished(cutoff, batch)
            batches += 1
            total += removed
            if progress is not None:
                progress(total)
            if removed.sagas < batch:
                break
        return PruneResult(
            dry_run=False,
            older_than_seconds=older_than.total_seconds(),
            cutoff=cutoff,
            batches=batches,
            rows=total,
        )

    # -- upgrades -----------------------------------------------------------------------

    async def check(self, definitions: SagaRegistry, *, sample: int = 20) -> CheckView:
        """Which unfinished sagas an engine loading only ``definitions`` would hold:
        those of a version it lacks, or of a version whose fingerprint is not the
        one they started with (a definition changed without a version bump)."""
        checked: builtins.list[CheckedDefinition] = []
        for running in await self.queries.running_definitions(sample):
            problem = reason = None
            try:
                definition = definitions.get(running.name, running.version)
            except UnknownSagaError:
                problem = "version missing"
                reason = (
                    f"{running.name} v{running.version} is not loaded (loaded: "
                    f"{loaded_versions(definitions, running.name)})"
                )
            else:
                if running.fingerprint not in (None, definition.fingerprint):
                    problem = "fingerprint mismatch"
                    reason = (
                        f"{running.name} v{running.version} has fingerprint "
                        f"{definition.fingerprint} here, these sagas started with "
                        f"{running.fingerprint}: bump the version of the changed definition"
                    )
            checked.append(
                CheckedDefinition(**running.model_dump(), problem=problem, reason=reason)
            )
        return CheckView(
            loads=[f"{s.name} v{s.version} (fingerprint {s.fingerprint})" for s in definitions],
            definitions=checked,
            would_hold=sum(c.count for c in checked if c.problem is not None),
        )

    async def counts(self) -> dict[SagaStatus, int]:
        """How many sagas are in each status."""
        return await self.queries.count_by_status()

    async def statuses(self, saga_ids: Sequence[str]) -> dict[str, SagaStatus]:
        """Status of each given saga (absent ids are left out)."""
        return await self.queries.statuses(saga_ids)


#: Retry backoffs, by their timer kind: what the saga waits for.
_BACKOFFS: dict[str, AwaitKind] = {
    TimerKind.RETRY: "retry",
    TimerKind.COMPENSATION_RETRY: "compensation retry",
}


def _awaits(detail: SagaDetail, work: PendingWork) -> builtins.list[AwaitView]:
    """What each step of a saga in progress waits for, in step order, from what is
    stored: the reply it awaits (a command's or compensation's reply, or a child
    saga's outcome when no timeout runs), a signal (a timeout but no reply awaited: a
    WaitFor step), the end of a backoff or of a delay."""
    timers = {t.step: t for t in work.timers}
    found: builtins.list[AwaitView] = []
    for st in detail.steps:
        kind, timer = work.awaiting.get(st.name), timers.get(st.name)
        if kind is None and timer is None:
            continue
        waits_for: AwaitKind
        deadline = next_retry = None
        if timer is not None and timer.kind in _BACKOFFS:
            waits_for, attempt, next_retry = _BACKOFFS[timer.kind], timer.attempt + 1, timer.due_at
        elif timer is not None and timer.kind == TimerKind.DELAY:
            waits_for, attempt, deadline = "delay", timer.attempt, timer.due_at
        else:
            if kind is None:
                waits_for = "signal"
            elif timer is None:
                waits_for = "child saga"
            else:
                waits_for = "reply" if kind is MessageKind.COMMAND else "compensation reply"
            own = st.attempts if kind is not MessageKind.COMPENSATION else st.compensation_attempts
            attempt = timer.attempt if timer is not None else own
            deadline = timer.due_at if timer is not None else None
        queued = None
        if waits_for in ("reply", "compensation reply"):
            times = [at for at in (work.unsent.get(st.name), work.unsent.get(None)) if at]
            queued = min(times) if times else None
        found.append(
            AwaitView(
                step=st.name,
                lane=st.lane,
                waits_for=waits_for,
                attempt=attempt,
                deadline=deadline,
                next_retry=next_retry,
                unsent=queued is not None,
                queued_at=queued,
            )
        )
    return found


def _check_awaited(
    letter: int, envelope: Envelope, awaiting: Sequence[Awaiting], status: SagaStatus
) -> None:
    """Refuse to replay a message its saga no longer waits for."""
    kind = envelope.in_reply_to if envelope.kind is MessageKind.REPLY else envelope.kind
    wanted = Awaiting(envelope.step, kind, envelope.attempt) if kind is not None else None
    if wanted in awaiting:
        return
    if not awaiting:
        now_waits = f"it is {status} and waits for no reply"
    else:
        now_waits = "it waits for " + ", ".join(
            f"the {token.kind} of step {token.step!r} (attempt {token.attempt})"
            for token in awaiting
        )
    raise OperationRefused(
        f"dead letter {letter} is a {describe(envelope)} of step {envelope.step!r} that saga "
        f"{envelope.saga_id} no longer waits for ({now_waits}); replaying it could run an "
        "effect nothing undoes. Use --force to replay it anyway"
    )


def _checked_prefix(prefix: str | None) -> str | None:
    """A saga id prefix to search for, refused like an id (LimitError)."""
    if not prefix:
        return None
    check_saga_id(prefix)
    return prefix


def _checked_keys(keys: Mapping[str, str] | None) -> dict[str, str] | None:
    """Business keys to search for, refused like those stored (LimitError): a value
    over the limit or not one printable line can match no saga."""
    if not keys:
        return None
    for name, value in keys.items():
        check_name(name, "a business key's name")
        check_key(name, value)
    return dict(keys)
