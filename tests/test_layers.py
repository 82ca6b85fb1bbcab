"""The package's import graph: no cycles, and every layer imports only the layers below it.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import`` at any
depth, lazy ones inside functions included), so it fails the moment someone adds an upward
or circular import, whether or not that import ever runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "ffsplit_export"
ROOT = Path(__file__).resolve().parent.parent / PKG

CORE = ("adapters", "calibrate", "plan", "split", "formats", "ops", "linear", "errors")
# what the core must never import: where models come from, data, evaluation, benchmarks, the CLI
ABOVE_CORE = ("cli", "models", "eval", "data", "bench", "export", "runtime", "recover", "pipeline", "trt")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    names = [base] if node.module else []
    # ``from . import x`` / ``from .pkg import sub`` may name submodules
    names += [f"{base}.{a.name}" for a in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (names that are not modules are dropped)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            else:
                continue
            for t in targets:
                if t.startswith(PKG):
                    # the longest prefix that is a module of the package
                    parts = t.split(".")
                    while parts and ".".join(parts) not in files:
                        parts.pop()
                    if parts and ".".join(parts) != mod:
                        deps.add(".".join(parts))
        graph[mod] = deps
    return graph


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (as a module list), or None. Importing ``a.b`` also runs ``a/__init__``,
    but a package importing its own submodules is not a cycle, so parents are not added as edges."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def _layer(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else ""


def test_graph_is_read():
    g = import_graph()
    # a few edges known to exist, so that an empty or broken graph cannot pass the tests below
    assert "ffsplit_export.adapters" in g["ffsplit_export.calibrate"]
    assert "ffsplit_export.cli.options" in g["ffsplit_export.cli.export"]
    assert "ffsplit_export.models.tiny" in g["ffsplit_export.models.loading"]  # lazy and top-level imports


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("core", CORE)
def test_core_imports_nothing_above_it(core):
    g = import_graph()
    mods = [m for m in g if _layer(m) == core]
    assert mods, f"no module for core layer {core!r}"
    bad = sorted((m, d) for m in mods for d in g[m] if _layer(d) in ABOVE_CORE)
    assert not bad, f"core module imports an upper layer: {bad}"


def test_only_the_cli_and_the_optimum_command_import_the_cli():
    g = import_graph()
    bad = sorted(m for m, deps in g.items() if _layer(m) != "cli" and any(_layer(d) == "cli" for d in deps))
    assert not bad, f"library modules import the CLI: {bad}"
    # and the optimum-cli registration uses the shared option helpers
    reg = Path(__file__).resolve().parent.parent / "optimum/commands/register/register_ffsplit.py"
    assert "ffsplit_export.cli.options" in reg.read_text()


def test_lower_layers_do_not_import_evaluation_benchmarks_or_models():
    g = import_graph()
    rules = {
        "models": ("cli", "eval", "bench", "export", "recover"),
        "data": ("cli", "eval", "bench", "export", "models", "recover"),
        "export": ("cli", "eval", "bench", "data"),
        "eval": ("cli", "bench", "export"),
        "runtime": ("cli", "eval", "bench", "export", "models", "data"),
    }
    bad = sorted((m, d) for m, deps in g.items() for d in deps if _layer(d) in rules.get(_layer(m), ()))
    assert not bad, f"upward imports: {bad}"
