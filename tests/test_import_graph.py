"""The import graph of the package has no cycle, and layers import only downwards.

Read from the source with ``ast`` (nothing is imported): every ``import`` and
``from … import`` of a pynbd module, at any depth — ``if TYPE_CHECKING:``
blocks included, since a cycle for the type checker is a cycle in the design.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pynbd"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The pynbd modules ``path`` imports (a package import counts as its ``__init__``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in modules:
                found.add(target)
    found.discard(name)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(edges: dict[str, set[str]], within: str) -> list[str] | None:
    """A cycle among the modules under ``within``, or None."""
    nodes = {n for n in edges if n == within or n.startswith(within + ".")}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("within", ["pynbd.server", "pynbd.proto", "pynbd.backend", "pynbd"])
def test_no_import_cycle(within):
    cycle = find_cycle(graph(), within)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"a.b"}, "a.b": {"a.c"}, "a.c": {"a.b"}}, "a") == ["a.b", "a.c", "a.b"]


@pytest.mark.parametrize("lower, upper", [
    ("pynbd.proto", "pynbd.server"), ("pynbd.proto", "pynbd.client"), ("pynbd.proto", "pynbd.backend"),
    ("pynbd.backend", "pynbd.server"), ("pynbd.backend", "pynbd.client"),
    ("pynbd.filters", "pynbd.server"), ("pynbd.filters", "pynbd.client"),
    ("pynbd.plugins", "pynbd.server"),
    # plugins and filters see backend/ and formats/ only (the nbd proxy plugin may use client/)
    ("pynbd.filters", "pynbd.control"), ("pynbd.plugins", "pynbd.control"),
    ("pynbd.filters", "pynbd.tools"), ("pynbd.plugins", "pynbd.tools"),
    ("pynbd.backend", "pynbd.filters"), ("pynbd.backend", "pynbd.plugins"),
    ("pynbd.backend", "pynbd.control"),
    # formats/ is pure: it parses and writes bytes for everyone above it
    ("pynbd.formats", "pynbd.server"), ("pynbd.formats", "pynbd.client"), ("pynbd.formats", "pynbd.filters"),
    ("pynbd.formats", "pynbd.plugins"), ("pynbd.formats", "pynbd.tools"), ("pynbd.formats", "pynbd.control"),
])
def test_layers_import_only_downwards(lower, upper):
    wrong = {f"{m} -> {t}" for m, targets in graph().items() if m.startswith(lower + ".")
             for t in targets if t == upper or t.startswith(upper + ".")}
    assert not wrong
