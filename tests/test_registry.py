from __future__ import annotations

import pytest
from pydantic import BaseModel

from engine.definition import Saga, Step
from engine.errors import ConfigError, DefinitionError, UnknownSagaError
from engine.registry import SagaRegistry
from sagas.order import place_order


class Inp(BaseModel):
    x: int = 0


def make(name: str, version: int = 1) -> Saga:
    return Saga(
        name=name,
        version=version,
        input=Inp,
        steps=[Step(name="only", participant="p", command=lambda ctx: {})],
    )


def test_from_modules_loads_the_order_saga() -> None:
    registry = SagaRegistry.from_modules(["sagas.order"])
    assert len(registry) == 1
    assert registry.get("place_order") is place_order
    assert list(registry) == [place_order]


def test_from_modules_skips_blank_entries() -> None:
    registry = SagaRegistry.from_modules(["", "  sagas.order  ", " "])
    assert [s.key for s in registry] == [("place_order", 1)]


def test_unknown_module_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"cannot import saga module 'sagas\.nope'"):
        SagaRegistry.from_modules(["sagas.nope"])


def test_module_without_sagas_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"module 'engine\.clock' defines no Saga"):
        SagaRegistry.from_modules(["engine.clock"])


def test_get_returns_the_latest_version_unless_asked() -> None:
    v1, v2, v3 = make("order", 1), make("order", 3), make("order", 2)
    registry = SagaRegistry([v1, v2, v3, make("other")])
    assert registry.get("order") is v2
    assert registry.get("order", 1) is v1
    assert registry.get("order", 2) is v3
    assert [s.key for s in registry] == [("order", 1), ("order", 2), ("order", 3), ("other", 1)]


def test_unknown_name_lists_the_known_names() -> None:
    registry = SagaRegistry([make("beta"), make("alpha"), make("alpha", 2)])
    with pytest.raises(UnknownSagaError) as info:
        registry.get("gamma")
    assert str(info.value) == "unknown saga 'gamma' (known: alpha v1, alpha v2, beta v1)"


def test_unknown_version_names_the_version() -> None:
    registry = SagaRegistry([make("alpha")])
    with pytest.raises(UnknownSagaError, match=r"unknown saga 'alpha' v7 \(known: alpha v1\)"):
        registry.get("alpha", 7)


def test_empty_registry_says_nothing_is_loaded() -> None:
    with pytest.raises(UnknownSagaError, match=r"\(no sagas are loaded\)"):
        SagaRegistry().get("anything")


def test_registering_a_different_definition_twice_is_an_error() -> None:
    first = make("alpha")
    registry = SagaRegistry([first])
    assert registry.register(first) is first  # the same object again is harmless
    with pytest.raises(DefinitionError, match=r"saga 'alpha' v1 is registered twice"):
        registry.register(make("alpha"))
    assert registry.get("alpha") is first
