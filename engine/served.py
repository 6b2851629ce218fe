"""What each engine serves, and whether one serves a given saga.

A saga is served by a definition of its name and version whose fingerprint is the one
it started with (for a saga started before fingerprints were recorded: one with its
very steps). Every
running engine registers the definitions it loads (``saga_served_definitions``, one row
per definition, refreshed by a heartbeat and past ``expires_at`` once the engine
stopped or died): an engine that cannot serve a saga tells from it whether another one
can (then it leaves the saga to it) or none can (then it holds the saga, see
:mod:`engine.held`); a client starts only versions some engine serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from engine.definition import Saga
from engine.errors import UnknownSagaError
from engine.model import SagaState
from engine.registry import SagaRegistry
from engine.store.base import SagaStore, ServedDefinition


def serves(definition: Saga, state: SagaState) -> bool:
    """Whether ``definition`` may advance ``state``: same name and version, and the
    fingerprint it started with. A saga that recorded none (started before
    fingerprints were) trusts its name and version, as long as the definition has the
    very steps it has."""
    if definition.key != (state.name, state.version):
        return False
    if state.fingerprint is None:
        return _step_names(definition) == sorted(state.steps)
    return state.fingerprint == definition.fingerprint


def _step_names(definition: Saga) -> list[str]:
    return sorted(node.name for node in definition.nodes)


def loaded_versions(registry: SagaRegistry, name: str) -> str:
    """The versions of ``name`` a registry loads, in words ("v1, v2")."""
    versions = [f"v{s.version}" for s in registry.versions(name)]
    return ", ".join(versions) if versions else "no version of it"


class Serving:
    """What this engine serves (its registry) and what the other live engines serve
    (:attr:`others`, refreshed by :class:`Registration`)."""

    def __init__(self, registry: SagaRegistry) -> None:
        self.registry = registry
        #: (name, version, fingerprint) the other live engines serve.
        self.others: frozenset[tuple[str, int, str]] = frozenset()

    def definition(self, state: SagaState) -> Saga | None:
        """This engine's definition of ``state``, if it serves it."""
        try:
            definition = self.registry.get(state.name, state.version)
        except UnknownSagaError:
            return None
        return definition if serves(definition, state) else None

    def why_not(self, state: SagaState) -> str:
        """Why this engine does not serve ``state``, in words (it must not)."""
        try:
            definition = self.registry.get(state.name, state.version)
        except UnknownSagaError:
            return (
                f"no running engine loads {state.name} v{state.version} (this one loads "
                f"{loaded_versions(self.registry, state.name)})"
            )
        if state.fingerprint is None:
            return (
                f"this engine's {state.name} v{state.version} has the steps "
                f"{', '.join(_step_names(definition))}, the saga has "
                f"{', '.join(sorted(state.steps))}: its definition changed without a "
                "version bump"
            )
        return (
            f"this engine's {state.name} v{state.version} has fingerprint "
            f"{definition.fingerprint}, the saga started with {state.fingerprint}: its "
            "definition changed without a version bump"
        )

    def elsewhere(self, state: SagaState) -> bool:
        """Whether another live engine serves ``state`` (for a saga that recorded no
        fingerprint: loads its name and version)."""
        return any(
            (name, version) == (state.name, state.version)
            and (state.fingerprint is None or fingerprint == state.fingerprint)
            for name, version, fingerprint in self.others
        )


def definitions_of(registry: SagaRegistry) -> list[tuple[str, int, str]]:
    """(name, version, fingerprint) of every definition a registry loads."""
    return [(s.name, s.version, s.fingerprint) for s in registry]


class Registration:
    """An engine's registration: written at start, refreshed by its heartbeat (which
    also refreshes what the others serve), deleted when it stops."""

    def __init__(
        self,
        store: SagaStore,
        serving: Serving,
        engine_id: str,
        *,
        interval: float,
    ) -> None:
        self.store = store
        self.serving = serving
        self.engine_id = engine_id
        #: Seconds between heartbeats; a registration lives three of them.
        self.interval = interval
        self._due: datetime | None = None
        self._started: datetime | None = None

    async def beat(self, now: datetime) -> None:
        """Register (again) if a heartbeat is due, and re-read what the others serve."""
        if self._due is not None and now < self._due:
            return
        if self._started is None:
            self._started = now
        await self.store.register(
            self.engine_id,
            definitions_of(self.serving.registry),
            started_at=self._started,
            now=now,
            expires_at=now + timedelta(seconds=3 * self.interval),
        )
        live = await self.store.live_definitions(now)
        self.serving.others = frozenset(
            (d.name, d.version, d.fingerprint) for d in live if d.engine_id != self.engine_id
        )
        self._due = now + timedelta(seconds=self.interval)

    async def leave(self) -> None:
        """Delete this engine's rows: it serves nothing any more."""
        self._due = self._started = None
        await self.store.deregister(self.engine_id)


def served_versions(
    live: Iterable[ServedDefinition], registry: SagaRegistry, name: str
) -> list[Saga]:
    """The definitions of ``name`` in ``registry`` that some live engine serves with
    the same fingerprint, oldest version first."""
    running = {(d.name, d.version, d.fingerprint) for d in live}
    return [s for s in registry.versions(name) if (s.name, s.version, s.fingerprint) in running]


def describe_served(live: Iterable[ServedDefinition], name: str) -> str:
    """What the live engines serve of ``name``, in words."""
    found = sorted({(d.version, d.fingerprint) for d in live if d.name == name})
    if not found:
        return f"no running engine serves {name}"
    shown = ", ".join(f"v{v} (fingerprint {fp})" for v, fp in found)
    return f"running engines serve {name} {shown}"
