"""The package's shape, checked on its source: import layers, no cycles, module and function size.

Layer order (README "How it works"): imports flow one way, from a higher layer to a lower one:

    cli  ->  run | experiments | tui | metrics  ->  exchange  ->  model  ->  data  ->  config  ->  errors, events, rundir

`tui`, `experiments` and `metrics` sit on one layer and never import each other; `run` is one layer below them
(the experiment runner starts runs through `run.processes`). Every import counts: module level,
function-local and under `TYPE_CHECKING` alike, because a cycle hidden there is still a design cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hetero_testnet"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE

LAYERS: dict[str, int] = {
    "errors": 0, "events": 0, "rundir": 0,
    "config": 1,
    "data": 2,
    "model": 3,
    "exchange": 4,
    "run": 5,
    "tui": 6, "experiments": 6, "metrics": 6,
    "cli": 7,
    "__main__": 8,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
WAIVER = "long-function:"
"""A function may pass MAX_FUNCTION_LINES only with a comment `# long-function: <why>` on its `def` line
or the line above it."""


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(src: Path = SRC) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every package module `path` imports, resolved to the most specific known module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = _modules(src)
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        unit = _unit(module)
        for target in targets:
            other = _unit(target)
            if not unit or not other or other == unit:
                continue  # the package root, or an import inside one unit
            if LAYERS.get(other, -1) >= LAYERS.get(unit, -1):
                bad.append(f"{module} -> {target} ({unit} is layer {LAYERS.get(unit)}, {other} is {LAYERS.get(other)})")
    return sorted(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {""}
    assert units <= set(LAYERS), f"modules outside any layer: {sorted(units - set(LAYERS))} (add them to LAYERS)"


def test_imports_follow_the_layer_order():
    bad = layer_violations(_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_a_layer_violation(tmp_path):
    """The checks above must be able to fail: a cycle through a function-local import and a
    TYPE_CHECKING import, and an upward import, are all found."""
    root = tmp_path / PACKAGE
    (root / "model").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "a.py").write_text("def f():\n    from hetero_testnet.model import b\n")
    (root / "model" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from .a import f\nimport hetero_testnet.cli\n")
    (root / "cli").mkdir()
    (root / "cli" / "__init__.py").write_text("from hetero_testnet.model.a import f\n")
    graph = _graph(root)
    assert graph["hetero_testnet.model.a"] == {"hetero_testnet.model.b"}
    assert graph["hetero_testnet.model.b"] == {"hetero_testnet.model.a", "hetero_testnet.cli"}
    assert find_cycles(graph)
    assert layer_violations(graph) == ["hetero_testnet.model.b -> hetero_testnet.cli (model is layer 3, cli is 7)"]


def test_modules_are_small():
    big = [f"{name} ({n} lines)" for name, path in _modules().items()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by job): {big}"


def test_functions_are_short_or_say_why():
    long = []
    for name, path in _modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            context = " ".join(lines[max(0, first - 2): node.lineno])
            if length > MAX_FUNCTION_LINES and WAIVER not in context:
                long.append(f"{name}.{node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a `# {WAIVER} <why>` comment: {long}"
