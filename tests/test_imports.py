"""The package's modules import one another without a circle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_gpipe"


def _imports() -> dict[str, set[str]]:
    """Each module of the package, with the package's modules it imports anywhere in its text."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            deps |= {name.split(".")[1] for name in names if name.startswith("lightning_gpipe.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports, as the modules along it, or [] if there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for dep in sorted(graph.get(module, ())):
            circle = visit(dep, path + [module])
            if circle:
                return circle
        done.add(module)
        return []

    return next((c for m in sorted(graph) if (c := visit(m, []))), [])


def test_no_module_imports_itself_through_others():
    assert _circle(_imports()) == []


def test_a_circle_is_found():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) == []
