"""The package's layout rules (DESIGN.md): imports point one way, no cycles, few top-level modules.

The import graph is read with ``ast`` (every ``import`` and ``from … import``, also those inside
functions), so the test sees what a lazy import would hide from ``sys.modules``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmcli"

LAYERS = {
    "__main__": 5,
    "cli": 5,
    "commands": 4,
    "training": 3,
    "evaluation": 3,
    "retrieval": 3,
    "serving": 3,
    "inference": 3,
    "viz": 3,
    "models": 2,
    "data": 2,
    "spec": 1,
    "distributed": 1,
    "io": 0,
    "errors": 0,
    "__init__": 0,
}
"""Rank of each top-level part: a module may import its own part and parts of a lower rank.
``distributed`` (device and process group) is used by every stage, like ``errors`` and ``io``."""

ALLOWED_ACROSS = {
    ("__main__", "cli"),
    ("evaluation", "retrieval"),
    ("evaluation", "viz"),
    ("training", "viz"),
    ("inference", "retrieval"),
    ("inference", "viz"),
    ("serving", "retrieval"),
    ("models", "data"),
    ("io", "errors"),
}
"""Imports between parts of the same rank, each allowed in one direction only: evaluation embeds
with the retrieval stage's code and draws its confusion matrices with viz; inference (captions)
reads its inputs with the retrieval stage's loaders and names its shards as an index's, and draws
its sheets (generate) with viz; serving searches with the retrieval stage's index and query
encoder; training draws its run's curves (``curves.png``) with viz; model
heads use the data stage's ignore index of masking."""

MAX_TOP_LEVEL = 6


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The mmcli modules ``name`` imports (a package import counts as its ``__init__``)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def part(name: str) -> str:
    return name.split(".")[1] if "." in name else "__init__"


def test_every_part_has_a_rank():
    assert {part(n) for n in MODULES} <= set(LAYERS)


def test_no_library_module_imports_the_command_layer():
    wrong = [
        f"{m} imports {t}"
        for m, ts in GRAPH.items()
        if part(m) not in ("commands", "cli", "__main__")
        for t in ts
        if part(t) in ("commands", "cli")
    ]
    assert wrong == []


def test_imports_point_down_the_stages():
    wrong = []
    for m, targets in GRAPH.items():
        for t in targets:
            a, b = part(m), part(t)
            if a == b or b == "__init__":
                continue
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and (a, b) not in ALLOWED_ACROSS):
                wrong.append(f"{m} imports {t}")
    assert wrong == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module (iterative: no recursion limit)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles():
    # A package's __init__ re-exporting its own modules is not a cycle of the layout.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    assert strongly_connected(graph) == []


@pytest.mark.parametrize(
    "graph, cycles",
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_the_cycle_finder_finds_cycles(graph, cycles):
    assert strongly_connected(graph) == cycles


def test_few_modules_at_the_top():
    top = [n for n, p in MODULES.items() if n.count(".") == 1 and p.name != "__init__.py" and n != "mmcli.__main__"]
    assert len(top) <= MAX_TOP_LEVEL, sorted(top)
