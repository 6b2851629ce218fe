"""The library's import graph, read from its source (ast): no cycle between its modules,
nothing of the example, the benchmark or the tests imported by it, and its layers
kept (the core on protocols, the adapters below it, the entry points on top).

Every import counts, those inside functions (lazy, for a fast start) and under
``TYPE_CHECKING`` too: a dependency deferred is still a dependency. A module path held
as data (the demo's ``workers.demo:scenario``) is not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "engine"
#: The repository's other top-level packages: the library must stand without them.
OUTSIDE = {"sagas", "workers", "bench", "tests", "migrations"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """Every module ``name`` (at ``path``) imports, as absolute dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from engine.worker import runner`` imports the module
                # engine.worker.runner; ``from engine.worker import Worker``, the package.
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def test_the_walk_sees_the_library() -> None:
    """The walk must see what is there, or the checks below would pass on nothing."""
    assert {"engine", "engine.cli.app", "engine.orchestrator", "engine.worker.runner"} <= set(
        MODULES
    )
    assert "engine.statemachine" in GRAPH["engine.advance"]
    assert "engine.advance" in GRAPH["engine.orchestrator"]
    assert "engine.worker.runner" in GRAPH["engine.worker"]
    assert "engine.cli.demo" in GRAPH["engine.cli.app"]  # a lazy import, inside a function


def test_the_library_does_not_import_the_example_bench_or_tests() -> None:
    offending = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] in OUTSIDE
    )
    assert offending == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as a path back to its start."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            if target in graph:
                cycle = visit(target, [*path, node])
                if cycle is not None:
                    return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle is not None:
            return cycle
    return None


def test_the_library_has_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "os"}, "b": {"c"}, "c": set()}) is None


# -- layers -------------------------------------------------------------------------------
#
# The core is written against protocols (store/base.py and store/queries.py,
# transport/base.py, worker/base.py); the adapters implement them with a database or a
# broker library; the entry points (and the composition root, engine/wiring.py) choose
# the adapters and put the parts together. Only direct imports are judged: that an
# entry point reaches a driver through an adapter is the point of it.

#: Implementations of the protocols, and what only they touch.
ADAPTERS = {
    "engine.database",  # URLs, engines, Alembic migrations
    "engine.store.sql",
    "engine.store.postgres",
    "engine.store.schema",
    "engine.worker.barrier",
    "engine.transport.kafka",
    "engine.transport.rabbitmq",
    "engine.transport.memory",
    "engine.transport.factory",
}
#: Where adapters are chosen: sagactl, the daemons, the embedded runner, the root.
ENTRY_POINTS = {
    "engine",
    "engine.connections",
    "engine.daemon",
    "engine.embedded",
    "engine.wiring",
}
#: Libraries that only adapters import: brokers, database drivers, SQL, migrations.
ADAPTER_LIBRARIES = {"aiokafka", "aio_pika", "aiormq", "asyncpg", "aiosqlite", "alembic"}
#: Core modules that do the engine's and the workers' work; adapters stay below them.
SERVICES = {
    "engine.advance",
    "engine.client",
    "engine.consumer",
    "engine.deadletters",
    "engine.deferred",
    "engine.definition",
    "engine.loader",
    "engine.orchestrator",
    "engine.registry",
    "engine.relay",
    "engine.statemachine",
    "engine.timers",
    "engine.watermark",
    "engine.worker.runner",
}
#: Direct imports of the core that cross the line, each with its reason.
ALLOWED = {
    # HandlerContext.session is the participant's SQLAlchemy session: the handlers' API.
    ("engine.worker.worker", "sqlalchemy.ext.asyncio"),
    # Which errors pass is judged by SQLAlchemy's exception types and SQLSTATEs.
    ("engine.store.failures", "sqlalchemy.exc"),
    # SagaClient.connect() is a front door to the composition root's data half: it
    # builds its store and engine there (engine.connections), not by itself.
    ("engine.client", "engine.connections"),
}


def is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module == "engine.cli" or module.startswith("engine.cli.")


def crossings(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports that break the layers: the core importing an adapter, an entry
    point or an adapter's library; an adapter importing the core's services or an
    entry point."""
    found: set[tuple[str, str]] = set()
    for module, targets in graph.items():
        if is_entry_point(module):
            continue
        for target in targets:
            if module in ADAPTERS:
                if target in SERVICES or is_entry_point(target):
                    found.add((module, target))
            elif (
                target in ADAPTERS
                or is_entry_point(target)
                or target.split(".")[0] in ADAPTER_LIBRARIES | {"sqlalchemy"}
            ):
                found.add((module, target))
    return found


def test_the_layers_name_real_modules() -> None:
    assert set(MODULES) >= ADAPTERS | SERVICES
    assert ENTRY_POINTS - {"engine.wiring"} <= set(MODULES)  # the root may come later


def test_the_core_is_written_against_protocols_and_adapters_stay_below_it() -> None:
    assert sorted(crossings(GRAPH) - ALLOWED) == []


def test_every_allowed_crossing_is_still_there() -> None:
    """An allowance outlives its reason only until this fails: then it goes."""
    assert sorted(ALLOWED - crossings(GRAPH)) == []


def test_a_crossing_is_found() -> None:
    graph = {
        "engine.relay": {"engine.store.sql", "engine.store.base"},
        "engine.worker.runner": {"sqlalchemy.orm"},
        "engine.store.sql": {"engine.advance", "engine.model"},
        "engine.transport.kafka": {"engine.daemon"},
        "engine.client": {"engine.embedded", "engine.views"},
        "engine.daemon": {"engine.store.sql", "aiokafka"},
    }
    assert crossings(graph) == {
        ("engine.relay", "engine.store.sql"),
        ("engine.worker.runner", "sqlalchemy.orm"),
        ("engine.store.sql", "engine.advance"),
        ("engine.transport.kafka", "engine.daemon"),
        ("engine.client", "engine.embedded"),
    }
