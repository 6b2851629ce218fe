"""Which saga definitions this process knows, loaded by module path."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator

from engine.definition import Saga
from engine.errors import ConfigError, DefinitionError, UnknownSagaError


class SagaRegistry:
    """Definitions by (name, version).

    Old versions stay registered next to new ones so that instances started under an
    old definition finish under it.
    """

    def __init__(self, sagas: Iterable[Saga] = ()) -> None:
        self._sagas: dict[tuple[str, int], Saga] = {}
        for saga in sagas:
            self.register(saga)

    def register(self, saga: Saga) -> Saga:
        """Add ``saga``; another definition of the same name and version is an error."""
        existing = self._sagas.get(saga.key)
        if existing is not None and existing is not saga:
            raise DefinitionError(f"saga {saga.name!r} v{saga.version} is registered twice")
        self._sagas[saga.key] = saga
        for child in saga.children:  # an engine that runs a saga runs its children
            self.register(child)
        return saga

    def get(self, name: str, version: int | None = None) -> Saga:
        """The definition of ``name`` at ``version``, by default its newest; an
        UnknownSagaError naming the known ones otherwise."""
        if version is not None:
            saga = self._sagas.get((name, version))
            if saga is None:
                raise UnknownSagaError(f"unknown saga {name!r} v{version}{self._known()}")
            return saga
        versions = [s for (n, _), s in self._sagas.items() if n == name]
        if not versions:
            raise UnknownSagaError(f"unknown saga {name!r}{self._known()}")
        return max(versions, key=lambda s: s.version)

    def versions(self, name: str) -> list[Saga]:
        """Every definition of ``name`` loaded, oldest version first."""
        return sorted(
            (s for (n, _), s in self._sagas.items() if n == name), key=lambda s: s.version
        )

    def __iter__(self) -> Iterator[Saga]:
        return iter(sorted(self._sagas.values(), key=lambda s: s.key))

    def __len__(self) -> int:
        return len(self._sagas)

    def _known(self) -> str:
        if self._sagas:
            return f" (known: {', '.join(f'{n} v{v}' for n, v in sorted(self._sagas))})"
        return " (no sagas are loaded): name their modules in SAGA_SAGAS or sagactl --sagas"

    @classmethod
    def from_modules(cls, paths: Iterable[str]) -> SagaRegistry:
        """Import each module and register every :class:`Saga` at its top level."""
        registry = cls()
        for path in paths:
            path = path.strip()
            if not path:
                continue
            try:
                module = importlib.import_module(path)
            except ImportError as exc:
                raise ConfigError(f"cannot import saga module {path!r}: {exc}") from None
            found = [v for v in vars(module).values() if isinstance(v, Saga)]
            if not found:
                raise ConfigError(f"module {path!r} defines no Saga")
            for saga in found:
                registry.register(saga)
        return registry
