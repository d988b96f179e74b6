"""The house rules of the code: imports point one way (no module of ``reliable`` or of its
integrations imports, even lazily or for type checking, one that imports it back), the
layers of docs/architecture.md hold, and no module grows past 600 lines."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"reliable": REPO_ROOT / "reliable", "reliable.integrations": REPO_ROOT / "integrations"}
MAX_LINES = 600

# Lower layers never import higher ones (docs/architecture.md). A module not listed
# belongs to the layer of its package's entry.
LAYERS = [
    ["reliable.errors", "reliable.clock", "reliable.durations", "reliable.serialization",
     "reliable.settings", "reliable.logs", "reliable.context", "reliable.cron",
     "reliable.background", "reliable.tracing"],
    ["reliable.store"],
    ["reliable.jobs", "reliable.limits", "reliable.runtime", "reliable.telemetry"],
    ["reliable.handles", "reliable.tasks", "reliable.overrides", "reliable.registry",
     "reliable.calls", "reliable.schedules"],
    ["reliable.steps", "reliable.execution", "reliable.handover", "reliable.overruns",
     "reliable.leases", "reliable.worker", "reliable.web", "reliable.operations",
     "reliable.retention", "reliable.timekeeper", "reliable.aio", "reliable.metrics"],
    ["reliable.app"],
    ["reliable.cli", "reliable.integrations", "reliable.dashboard", "reliable"],
]  # fmt: skip


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "migrations" in path.parts:
                continue  # Alembic scripts, run by Alembic, import nothing of ours
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module of ours that ``name`` imports: at the top, in a function, or under
    ``if TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from . import x`` imports the module ``x``, not its package's body.
            submodules = [f"{source}.{alias.name}" for alias in node.names]
            targets = [m for m in submodules if m in known] or [source]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_of(name: str) -> int:
    candidates = [
        (len(entry), level)
        for level, entries in enumerate(LAYERS)
        for entry in entries
        if name == entry or name.startswith(entry + ".")
    ]
    assert candidates, f"{name} has no layer in LAYERS: place it there and in the docs"
    return max(candidates)[1]


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph()) == []


def test_the_graph_sees_cycles_and_lazy_imports() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    known = modules()
    lazy = set(imported("reliable.app", known["reliable.app"], known))
    assert "reliable.worker" in lazy  # and a function-level import would count as well


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_600_lines(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by concept"
