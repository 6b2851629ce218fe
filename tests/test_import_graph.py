"""The library's import graph, read from its source (ast): no cycle between its modules,
and nothing of the example, the benchmark or the tests imported by it.

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
