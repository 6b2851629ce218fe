"""Every public name of ``engine`` says what it is for.

Walks ``engine.__all__``: each class and function, and each public method and
property a class defines itself, has a docstring of its own (not one inherited, not
the signature a dataclass makes up).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterator
from typing import Any

import engine


def _own_doc(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):  # a dataclass's made-up signature
        return None
    return str(doc)


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties that ``cls`` itself defines."""
    if issubclass(cls, enum.Enum):
        return
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, classmethod | staticmethod):
            yield name, value.__func__
        elif isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


def undocumented() -> list[str]:
    missing = []
    for name in engine.__all__:
        value = getattr(engine, name)
        if inspect.isclass(value):
            if _own_doc(value) is None:
                missing.append(name)
            missing += [f"{name}.{m}" for m, f in _members(value) if not (f and f.__doc__)]
        elif callable(value) and not value.__doc__:
            missing.append(name)
    return missing


def test_every_public_class_function_and_method_has_a_docstring() -> None:
    assert undocumented() == []


def test_the_check_sees_a_missing_docstring() -> None:
    class Bare:
        def method(self) -> None:
            pass

    engine.Bare = Bare  # type: ignore[attr-defined]
    engine.__all__.append("Bare")
    try:
        assert undocumented()[-2:] == ["Bare", "Bare.method"]
    finally:
        engine.__all__.remove("Bare")
        del engine.Bare  # type: ignore[attr-defined]
