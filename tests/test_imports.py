"""The package's layers: no import circle (lazy imports inside functions count too), lower layers never import
upper ones (import-linter, ``tests/importlinter.ini``), Lightning's trainer API imported by the integration layer
alone, and modules small enough to hold in mind."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_gpipe"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(path: Path) -> set[str]:
    """The modules ``path`` imports anywhere in its text, as written."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def _imports() -> dict[str, set[str]]:
    """Each module of the package, with the package's modules it imports anywhere in its text (an imported
    package's ``__init__`` counts, as Python runs it, but for the module's own packages: they are imported first)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imported(path):
            parts = imported.split(".")
            deps |= {".".join(parts[:n]) for n in range(2, len(parts) + 1)} & modules.keys()
        own = name.split(".")
        graph[name] = deps - {".".join(own[:n]) for n in range(1, len(own) + 1)}
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


def test_lower_layers_never_import_upper_ones():
    """The contracts of tests/importlinter.ini: the layers' order, no Lightning below the integration layer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), str(ROOT / "tests" / "importlinter.ini")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_only_the_integration_layer_imports_the_trainer_api():
    """lightning.pytorch (trainer, modules, callbacks) is the integration layer's; the package's root imports it to
    register the strategy by name."""
    importers = {
        name for name, path in _modules().items() if any(n.startswith("lightning.pytorch") for n in _imported(path))
    }
    assert importers - {"lightning_gpipe"}, "the test would pass on a package that never imports Lightning"
    assert {n for n in importers if not n.startswith("lightning_gpipe.integration")} == {"lightning_gpipe"}


def test_modules_stay_small():
    """No module over 400 lines; the strategy itself, Lightning's hooks only, at most 300."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert sizes["lightning_gpipe.integration.strategy"] <= 300
