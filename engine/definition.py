"""Declarative saga definitions.

A definition is data plus small builder functions; it is validated when constructed so
that a mistake surfaces at import time with a precise message, never mid-saga.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.errors import DefinitionError, InvalidInputError
from engine.limits import NAME_LENGTH

#: Bounded by the name columns (engine/limits.py).
_NAME = re.compile(rf"^[a-z][a-z0-9_.-]{{0,{NAME_LENGTH - 1}}}$")


@dataclass(frozen=True)
class StepContext:
    """What a command builder sees: the saga input and the replies of earlier steps."""

    saga_id: str
    input: BaseModel
    replies: Mapping[str, Mapping[str, Any]]


Payload = BaseModel | Mapping[str, Any]
Builder = Callable[[StepContext], Payload]


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter.

    ``jitter`` is the fraction of each delay that is randomised downwards, so replicas
    retrying the same failure spread out instead of hammering together.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise DefinitionError("RetryPolicy needs 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise DefinitionError("RetryPolicy.multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise DefinitionError("RetryPolicy.jitter must be between 0 and 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        spread = (rng or random).random() * self.jitter
        return base * (1.0 - spread)


#: Compensations must eventually succeed, so they get more, slower attempts by default.
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=8, initial_backoff=0.5, max_backoff=30.0)


@dataclass(frozen=True)
class Compensation:
    """The command that undoes a step; ``name`` is what the participant dispatches on."""

    name: str
    build: Builder


@dataclass(frozen=True)
class Step:
    """One step: a command sent to a participant, and optionally its compensation.

    A step without a compensation is a pivot: once it succeeded the saga can no longer
    be undone, so the steps after it may not have compensations either.
    """

    name: str
    participant: str
    command: Builder
    compensation: Compensation | None = None
    #: The name the participant dispatches on; defaults to the step name.
    command_name: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    timeout: timedelta = timedelta(seconds=30)

    @property
    def action_name(self) -> str:
        """The command name the participant dispatches on."""
        return self.command_name or self.name

    @property
    def is_pivot(self) -> bool:
        """Without a compensation: once it succeeded the saga can no longer be undone."""
        return self.compensation is None


@dataclass(frozen=True)
class Saga:
    """A saga definition: its name and version, the pydantic model of its input, and
    its steps in order. Validated when built, so a mistake fails at import time."""

    name: str
    version: int
    input: type[BaseModel]
    steps: Sequence[Step]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise DefinitionError(
                f"saga name {self.name!r} must be lowercase letters, digits, '_', '.', '-'"
            )
        if self.version < 1:
            raise DefinitionError(f"saga {self.name!r}: version must be at least 1")
        if not (isinstance(self.input, type) and issubclass(self.input, BaseModel)):
            raise DefinitionError(f"saga {self.name!r}: input must be a pydantic model class")
        if not self.steps:
            raise DefinitionError(f"saga {self.name!r}: needs at least one step")
        object.__setattr__(self, "steps", tuple(self.steps))
        index: dict[str, int] = {}
        #: Command name -> what already uses it ("step 'a'", "compensation of step 'a'").
        names: dict[str, str] = {}
        pivot: str | None = None
        for position, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise DefinitionError(f"saga {self.name!r}: steps must be Step objects")
            where = f"saga {self.name!r} step {step.name!r}"
            if not _NAME.match(step.name):
                raise DefinitionError(
                    f"{where}: name must be lowercase letters, digits, '_', '.', '-'"
                )
            if step.name in index:
                raise DefinitionError(f"saga {self.name!r}: duplicate step name {step.name!r}")
            if not _NAME.match(step.participant):
                raise DefinitionError(f"{where}: participant {step.participant!r} is not a name")
            if not callable(step.command):
                raise DefinitionError(f"{where}: command must be a callable building the payload")
            if step.timeout <= timedelta(0):
                raise DefinitionError(f"{where}: timeout must be positive")
            if step.compensation is not None:
                if pivot is not None:
                    raise DefinitionError(
                        f"{where}: cannot have a compensation, it comes after the pivot "
                        f"step {pivot!r} (a step without compensation) and so can never "
                        "be undone"
                    )
                if not _NAME.match(step.compensation.name):
                    raise DefinitionError(f"{where}: compensation name is not a name")
                if not callable(step.compensation.build):
                    raise DefinitionError(f"{where}: compensation.build must be callable")
            elif pivot is None:
                pivot = step.name
            self._claim(names, step.action_name, f"step {step.name!r}")
            if step.compensation is not None:
                self._claim(names, step.compensation.name, f"compensation of step {step.name!r}")
            index[step.name] = position
        object.__setattr__(self, "_index", index)

    def _claim(self, names: dict[str, str], name: str, user: str) -> None:
        """Record that ``user`` sends command ``name``. Two uses of one name in a saga
        are refused: a participant's handler, its barrier row and every reply are told
        apart by that name, so a shared one would run the wrong handler or be mistaken
        for the other's outcome."""
        first = names.setdefault(name, user)
        if first != user:
            raise DefinitionError(
                f"saga {self.name!r}: {user} and {first} both use the command name {name!r}; "
                "give each its own"
            )

    def shape(self) -> list[dict[str, Any]]:
        """The structure of the definition as JSON-able data, one dict per element of
        ``steps``: what an instance in flight depends on (step names, where each goes,
        what undoes it, where the pivot is). Timeouts, retry policies and builders are
        left out: changing them does not strand a saga started before."""
        return [_shape(node) for node in self.steps]

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of :meth:`shape`: a saga stores the one it started with, and an
        engine whose definition of the same name and version has another holds it
        instead of advancing it with steps it never had."""
        canonical = json.dumps(self.shape(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def key(self) -> tuple[str, int]:
        """(name, version): how the registry and every saga row name this definition."""
        return (self.name, self.version)

    def step(self, name: str) -> Step:
        """The step called ``name``; a DefinitionError if there is none."""
        try:
            return self.steps[self._index[name]]
        except KeyError:
            raise DefinitionError(
                f"saga {self.name!r} v{self.version} has no step {name!r}"
            ) from None

    def position(self, name: str) -> int:
        """The 0-based place of step ``name`` in the saga."""
        return self._index[name]

    def parse_input(self, data: Any) -> BaseModel:
        """Validate raw input; the error names the first bad field."""
        if isinstance(data, self.input):
            return data
        try:
            return self.input.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidInputError(f"invalid input for saga {self.name!r}: {problems}") from None


def _shape(node: Step) -> dict[str, Any]:
    """One node's part of :meth:`Saga.shape` (each node kind adds its own fields)."""
    return {
        "kind": "step",
        "name": node.name,
        "participant": node.participant,
        "command": node.action_name,
        "compensation": node.compensation.name if node.compensation is not None else None,
        "pivot": node.is_pivot,
    }


def build_payload(builder: Builder, context: StepContext) -> dict[str, Any]:
    """Run a builder and turn its result into JSON-ready data."""
    value = builder(context)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return dict(value)
