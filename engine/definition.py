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

from engine.errors import DefinitionError, InvalidInputError, LimitError
from engine.limits import MAX_KEYS, NAME_LENGTH, check_key

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

    #: None: retry until it succeeds (steps after the pivot, which cannot be undone).
    max_attempts: int | None = 3
    initial_backoff: float = 0.2
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise DefinitionError(
                "RetryPolicy.max_attempts must be at least 1 (a whole number), or None "
                f"for no limit (got {self.max_attempts!r})"
            )
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise DefinitionError("RetryPolicy needs 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise DefinitionError("RetryPolicy.multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise DefinitionError("RetryPolicy.jitter must be between 0 and 1")

    def allows(self, used: int) -> bool:
        """Whether another attempt may follow ``used`` failed ones."""
        return self.max_attempts is None or used < self.max_attempts

    def shown(self, base: int) -> str:
        """The last attempt number of a budget starting after ``base``, for messages."""
        return "unlimited" if self.max_attempts is None else str(base + self.max_attempts)

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
class WaitFor:
    """A step completed when the application signals the named event to the saga
    (:meth:`engine.SagaClient.signal`, ``sagactl signal``); its payload becomes the
    step's reply, visible to later builders. No signal within ``timeout`` fails the
    step. A signal that comes before the saga reaches the step is kept for it.

    It has nothing to undo, so compensating it is a no-op."""

    name: str
    #: The event's name; defaults to the step's name.
    event: str | None = None
    timeout: timedelta = timedelta(days=1)

    @property
    def event_name(self) -> str:
        """The name a signal must carry to complete this step."""
        return self.event or self.name


@dataclass(frozen=True)
class Delay:
    """A durable pause: a timer row, so it survives restarts of every engine.

    It has nothing to undo, so compensating it is a no-op."""

    name: str
    duration: timedelta


LocalFunction = Callable[[StepContext], Payload | None]


@dataclass(frozen=True)
class Local:
    """A function the engine runs itself, with no broker round trip, in the
    transaction that advances the saga: its result is the step's reply, written with
    the saga's state or not at all. It must not do I/O that a rollback cannot undo.

    Raising :class:`~engine.errors.BusinessFailure` fails the step; any other
    exception is retried under ``retry``. ``compensation`` (optional) is run the same
    way when the saga is compensated; without one the step has nothing to undo."""

    name: str
    run: LocalFunction
    compensation: LocalFunction | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY


@dataclass(frozen=True)
class Child:
    """Another saga started as a step of this one, with the input ``input`` builds.

    Its outcome is the step's: completed, the step succeeded (its reply holds the
    child's id and replies); compensated, the step failed. Compensating the step
    compensates the child (cancelling it if it still runs). A child with a pivot is a
    pivot of its parent: once started it can only go forward. The engine that runs the
    parent runs the child too (registering a saga registers its children)."""

    name: str
    saga: Saga
    input: Builder


#: A node of a saga that runs: a participant step, a wait, a delay, a local function,
#: a child saga.
Node = Step | WaitFor | Delay | Local | Child


@dataclass(frozen=True)
class Parallel:
    """Branches run at once; the group succeeds when every branch has.

    A branch is a sequence of nodes run one after the other. When one fails, the
    branches in flight are stopped (their outcome is unknown), and every node that
    succeeded or may have run is compensated in reverse order of completion, then the
    nodes before the group. ``limit`` caps how many branches run at the same time."""

    name: str
    branches: Sequence[Sequence[Node]]
    limit: int | None = None


#: What a saga's ``steps`` holds: a node, or a group of parallel branches.
Element = Node | Parallel


@dataclass(frozen=True)
class Stage:
    """One element of a saga as the state machine walks it: its branches of node
    names (a single node is one branch of one), the group's name and limit."""

    group: str | None
    branches: tuple[tuple[str, ...], ...]
    limit: int | None = None


def _shown_kind(node: object) -> str:
    return type(node).__name__


#: A function of a saga's parsed input giving its business keys, name -> value.
KeyFunction = Callable[[Any], Mapping[str, str]]


@dataclass(frozen=True)
class Saga:
    """A saga definition: its name and version, the pydantic model of its input, and
    its steps in order (nodes, or :class:`Parallel` groups of them). Validated when
    built, so a mistake fails at import time.

    ``keys`` names what a saga is about, so an operator finds it by that
    (``sagactl list --key customer_id=c-42``): input field names, or a function of the
    parsed input returning name -> value. They are stored when the saga starts and are
    not part of its :attr:`fingerprint` (they change nothing a saga in flight does)."""

    name: str
    version: int
    input: type[BaseModel]
    steps: Sequence[Element]
    keys: Sequence[str] | KeyFunction = ()
    _nodes: Mapping[str, Node] = field(init=False, repr=False, compare=False)
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)
    _stages: tuple[Stage, ...] = field(init=False, repr=False, compare=False)
    _lanes: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _forward_only: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise DefinitionError(
                f"saga {self.name!r} must be lowercase letters, digits, '_', '.', '-'"
            )
        if self.version < 1:
            raise DefinitionError(f"saga {self.name!r}: version must be at least 1")
        if not (isinstance(self.input, type) and issubclass(self.input, BaseModel)):
            raise DefinitionError(f"saga {self.name!r}: input must be a pydantic model class")
        if not self.steps:
            raise DefinitionError(f"saga {self.name!r}: needs at least one step")
        object.__setattr__(self, "steps", tuple(self.steps))
        if not callable(self.keys):
            object.__setattr__(self, "keys", self._key_fields(self.keys))
        _Validator(self).run()

    def _key_fields(self, keys: object) -> tuple[str, ...]:
        """``keys`` given as input field names, checked: names, unique, fields of the
        input model, at most :data:`~engine.limits.MAX_KEYS`."""
        where = f"saga {self.name!r}: keys"
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise DefinitionError(
                f"{where} must be a sequence of input field names (e.g. ('order_id',)) or "
                f"a function of the input, not {keys!r}"
            )
        fields = tuple(keys)
        if len(fields) > MAX_KEYS:
            raise DefinitionError(f"{where}: at most {MAX_KEYS} keys, not {len(fields)}")
        for key in fields:
            if not isinstance(key, str) or not _NAME.match(key):
                raise DefinitionError(
                    f"{where}: {key!r} is not a name (lowercase letters, digits, '_', '.', '-')"
                )
            if key not in self.input.model_fields:
                raise DefinitionError(
                    f"{where}: {key!r} is not a field of the input model {self.input.__name__}"
                )
        if len(set(fields)) != len(fields):
            raise DefinitionError(f"{where}: a field is named twice in {fields!r}")
        return fields

    def business_keys(self, data: BaseModel | Mapping[str, Any]) -> dict[str, str]:
        """The saga's business keys for input ``data``, name -> value: stored when it
        starts. A field that is None or empty gives no key. Refused with a clear error: an input
        the model refuses (InvalidInputError), a value that is not one printable line
        of at most :data:`~engine.limits.KEY_VALUE_LENGTH` characters (LimitError), a
        key function that raises or returns something else than names to text."""
        if not self.keys:
            return {}
        parsed = self.parse_input(data)
        if callable(self.keys):
            return self._computed_keys(parsed)
        assert isinstance(self.keys, tuple)
        dumped = parsed.model_dump(mode="json", include=set(self.keys))
        found: dict[str, str] = {}
        for key in self.keys:
            value = dumped.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, dict | list):
                raise InvalidInputError(
                    f"saga {self.name!r}: business key {key!r} must be text or a number, "
                    f"not {type(value).__name__}"
                )
            found[key] = value if isinstance(value, str) else json.dumps(value)
        return self._checked_keys(found)

    def _computed_keys(self, parsed: BaseModel) -> dict[str, str]:
        assert callable(self.keys)
        try:
            found = self.keys(parsed)
        except Exception as exc:  # the user's function: said where it went wrong
            raise InvalidInputError(
                f"saga {self.name!r}: its keys function raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(found, Mapping):
            raise DefinitionError(
                f"saga {self.name!r}: its keys function must return a mapping of names "
                f"to text, not {type(found).__name__}"
            )
        for key, value in found.items():
            if not isinstance(key, str) or not _NAME.match(key):
                raise DefinitionError(f"saga {self.name!r}: business key {key!r} is not a name")
            if not isinstance(value, str):
                raise DefinitionError(
                    f"saga {self.name!r}: business key {key!r} must be text, not "
                    f"{type(value).__name__}"
                )
        return self._checked_keys(dict(found))

    def _checked_keys(self, found: dict[str, str]) -> dict[str, str]:
        if len(found) > MAX_KEYS:
            raise LimitError(f"saga {self.name!r}: at most {MAX_KEYS} business keys")
        for key, value in found.items():
            try:
                check_key(key, value)
            except LimitError as exc:
                raise LimitError(f"saga {self.name!r}: {exc}") from None
        return found

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

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node, groups flattened, in definition order."""
        return tuple(self._nodes.values())

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The elements as the state machine walks them, one after the other."""
        return self._stages

    @property
    def undoable(self) -> bool:
        """Whether the whole saga can be undone (it has no pivot)."""
        return not any(is_pivot(n) for n in self._nodes.values())

    @property
    def children(self) -> tuple[Saga, ...]:
        """The sagas this one starts as steps (:class:`Child`), directly."""
        return tuple(n.saga for n in self._nodes.values() if isinstance(n, Child))

    @property
    def participant_steps(self) -> tuple[Step, ...]:
        """The nodes that are commands to participants."""
        return tuple(n for n in self._nodes.values() if isinstance(n, Step))

    def step(self, name: str) -> Node:
        """The node called ``name``; a DefinitionError if there is none."""
        try:
            return self._nodes[name]
        except KeyError:
            raise DefinitionError(
                f"saga {self.name!r} v{self.version} has no step {name!r}"
            ) from None

    def position(self, name: str) -> int:
        """The 0-based place of node ``name`` in the saga, groups flattened."""
        return self._index[name]

    def lane(self, name: str) -> str | None:
        """``group[branch]`` for a node inside a parallel group (branches from 1)."""
        return self._lanes.get(name)

    def forward_only(self, name: str) -> bool:
        """Whether a pivot always completes before node ``name`` runs: from there the
        saga can only go forward, so the node is retried, never compensated."""
        return name in self._forward_only

    def waits_for(self, event: str) -> list[WaitFor]:
        """The wait nodes a signal named ``event`` completes."""
        return [n for n in self._nodes.values() if isinstance(n, WaitFor) and n.event_name == event]

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


def timer_length(node: Node) -> timedelta:
    """How long a node's timer runs: a step's or a wait's timeout, a delay's length
    (a local step has none)."""
    if isinstance(node, Delay):
        return node.duration
    if isinstance(node, (Step, WaitFor)):
        return node.timeout
    return timedelta(0)


def undoes(node: Node) -> bool:
    """Whether compensating ``node`` sends or runs anything."""
    if isinstance(node, Child):  # a child of waits and delays has nothing to undo
        return node.saga.undoable and any(undoes(n) for n in node.saga.nodes)
    return isinstance(node, (Step, Local)) and node.compensation is not None


def is_pivot(node: Node) -> bool:
    """A participant step without compensation, or a child saga with a pivot: once
    it succeeded (or may have), the saga can no longer be undone."""
    if isinstance(node, Child):
        return not node.saga.undoable
    return isinstance(node, Step) and node.compensation is None


class _Validator:
    """Checks a saga's structure and fills its indexes: unique names, one owner per
    command name, and the pivot rule: every node that can be undone completes before
    any pivot can run (a branch running beside a pivot cannot have a compensation)."""

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        self.nodes: dict[str, Node] = {}
        self.index: dict[str, int] = {}
        self.lanes: dict[str, str] = {}
        self.commands: dict[str, str] = {}
        self.groups: set[str] = set()
        #: The first pivot met, in walking order; nodes after it are forward-only.
        self.pivot: str | None = None
        self.forward_only: set[str] = set()

    def run(self) -> None:
        stages: list[Stage] = []
        for element in self.saga.steps:
            if isinstance(element, Parallel):
                stages.append(self._group(element))
            else:
                self._node(element)
                if self.pivot is not None and self.pivot != element.name:
                    self.forward_only.add(element.name)
                if is_pivot(element) and self.pivot is None:
                    self.pivot = element.name
                stages.append(Stage(None, ((element.name,),)))
        saga = self.saga
        object.__setattr__(saga, "_nodes", self.nodes)
        object.__setattr__(saga, "_index", self.index)
        object.__setattr__(saga, "_stages", tuple(stages))
        object.__setattr__(saga, "_lanes", self.lanes)
        object.__setattr__(saga, "_forward_only", frozenset(self.forward_only))

    def _where(self, name: str) -> str:
        return f"saga {self.saga.name!r} step {name!r}"

    def _name(self, name: object, what: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise DefinitionError(
                f"saga {self.saga.name!r} {what} {name!r}: name must be lowercase letters, "
                "digits, '_', '.', '-'"
            )
        if name in self.nodes or name in self.groups:
            raise DefinitionError(f"saga {self.saga.name!r}: duplicate step name {name!r}")

    def _group(self, group: Parallel) -> Stage:
        self._name(group.name, "group")
        self.groups.add(group.name)
        where = f"saga {self.saga.name!r} group {group.name!r}"
        branches = tuple(tuple(b) for b in group.branches)
        if not branches or any(not b for b in branches):
            raise DefinitionError(f"{where}: needs at least one branch, and no empty branch")
        if group.limit is not None and group.limit < 1:
            raise DefinitionError(f"{where}: limit must be at least 1")
        before = self.pivot
        pivots: dict[int, str] = {}
        for b, branch in enumerate(branches, start=1):
            seen_pivot: str | None = None
            for node in branch:
                if isinstance(node, Parallel):
                    raise DefinitionError(
                        f"{where}: parallel groups do not nest; make the inner group a "
                        "step of its own before or after this one"
                    )
                self._node(node, pivot=seen_pivot or before)
                self.lanes[node.name] = f"{group.name}[{b}]"
                if (seen_pivot or before) is not None:
                    self.forward_only.add(node.name)
                if is_pivot(node) and seen_pivot is None:
                    seen_pivot = node.name
            if seen_pivot is not None:
                pivots[b] = seen_pivot
        if pivots and before is None:
            # A branch beside a pivot may run after it: nothing there may need undoing.
            for b, branch in enumerate(branches, start=1):
                for node in branch:
                    if b not in pivots and undoes(node):
                        raise DefinitionError(
                            f"{self._where(node.name)}: cannot have a compensation, its branch "
                            f"runs beside the pivot step {next(iter(pivots.values()))!r} "
                            "(a step without compensation), so it could complete after it "
                            "and never be undone; move it before the group"
                        )
            self.pivot = next(iter(pivots.values()))
        return Stage(group.name, tuple(tuple(n.name for n in br) for br in branches), group.limit)

    def _node(self, node: object, pivot: str | None = None) -> None:
        pivot = pivot if pivot is not None else self.pivot
        if not isinstance(node, (Step, WaitFor, Delay, Local, Child)):
            raise DefinitionError(
                f"saga {self.saga.name!r}: steps must be Step objects (or WaitFor, Delay, "
                f"Local, Child, Parallel), not {_shown_kind(node)}"
            )
        self._name(node.name, "step")
        where = self._where(node.name)
        if isinstance(node, Step):
            self._step(node, where, pivot)
        elif isinstance(node, WaitFor):
            self._name_only(node.event_name, where, "event")
            if node.timeout <= timedelta(0):
                raise DefinitionError(f"{where}: timeout must be positive")
        elif isinstance(node, Delay):
            if node.duration < timedelta(0):
                raise DefinitionError(f"{where}: duration must not be negative")
        elif isinstance(node, Child):
            if not isinstance(node.saga, Saga):
                raise DefinitionError(f"{where}: saga must be a Saga definition")
            if not callable(node.input):
                raise DefinitionError(f"{where}: input must be a callable building the input")
            if undoes(node):
                self._after_pivot(where, pivot)
        else:
            if not callable(node.run):
                raise DefinitionError(f"{where}: run must be a callable")
            if node.compensation is not None:
                if not callable(node.compensation):
                    raise DefinitionError(f"{where}: compensation must be a callable")
                self._after_pivot(where, pivot)
        self.index[node.name] = len(self.nodes)
        self.nodes[node.name] = node

    def _name_only(self, name: str, where: str, what: str) -> None:
        if not _NAME.match(name):
            raise DefinitionError(f"{where}: {what} {name!r} is not a name")

    def _after_pivot(self, where: str, pivot: str | None) -> None:
        if pivot is not None:
            raise DefinitionError(
                f"{where}: cannot have a compensation, it comes after the pivot "
                f"step {pivot!r} (a step without compensation) and so can never "
                "be undone"
            )

    def _step(self, step: Step, where: str, pivot: str | None) -> None:
        if not _NAME.match(step.participant):
            raise DefinitionError(f"{where}: participant {step.participant!r} is not a name")
        if not callable(step.command):
            raise DefinitionError(f"{where}: command must be a callable building the payload")
        if step.timeout <= timedelta(0):
            raise DefinitionError(f"{where}: timeout must be positive")
        if step.compensation is not None:
            self._after_pivot(where, pivot)
            if not _NAME.match(step.compensation.name):
                raise DefinitionError(f"{where}: compensation name is not a name")
            if not callable(step.compensation.build):
                raise DefinitionError(f"{where}: compensation.build must be callable")
        self.saga._claim(self.commands, step.action_name, f"step {step.name!r}")
        if step.compensation is not None:
            self.saga._claim(
                self.commands, step.compensation.name, f"compensation of step {step.name!r}"
            )


def _shape(node: Element) -> dict[str, Any]:
    """One node's part of :meth:`Saga.shape` (each node kind adds its own fields). A
    group's limit, a wait's timeout and a delay's length are left out: like a step's
    timeout, they change nothing a saga in flight has recorded."""
    if isinstance(node, Step):
        return {
            "kind": "step",
            "name": node.name,
            "participant": node.participant,
            "command": node.action_name,
            "compensation": node.compensation.name if node.compensation is not None else None,
            "pivot": node.is_pivot,
        }
    if isinstance(node, Parallel):
        branches = [[_shape(n) for n in branch] for branch in node.branches]
        return {"kind": "parallel", "name": node.name, "branches": branches}
    if isinstance(node, WaitFor):
        return {"kind": "wait", "name": node.name, "event": node.event_name}
    if isinstance(node, Delay):
        return {"kind": "delay", "name": node.name}
    if isinstance(node, Local):
        return {"kind": "local", "name": node.name, "undoes": node.compensation is not None}
    return {
        "kind": "child",
        "name": node.name,
        "saga": node.saga.name,
        "version": node.saga.version,
        "fingerprint": node.saga.fingerprint,
    }


def build_payload(builder: Builder, context: StepContext) -> dict[str, Any]:
    """Run a builder and turn its result into JSON-ready data."""
    value = builder(context)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return dict(value)
