"""The package's shape: imports go one way, with no cycle, and no function is too long to read.

The import graph is read from the source with `ast`, lazy imports inside functions included
(they are cycles all the same, only later); imports under ``if TYPE_CHECKING:`` never run and
are left out. ``from a.b import c`` is an edge to ``a.b``, and to ``a.b.c`` when that is a
module; importing a submodule runs its package's ``__init__`` too, but that edge is implicit
and every package would form a cycle through it, so it is not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "consensus_gates"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# Around the core: the core never imports these, not even lazily
OUTER = ("training", "bench", "experiments", "baselines", "cli")
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _runtime_imports(tree: ast.AST):
    """Import nodes that run: everywhere but under ``if TYPE_CHECKING:``."""
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
            yield node


def _edges(name: str, path: Path, source: str | None = None) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_imports(ast.parse(source or path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_outer(name: str) -> bool:
    return name.split(".")[1:2] and name.split(".")[1] in OUTER


def test_the_graph_reader_sees_lazy_relative_and_submodule_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import tracing\n"
        "from ..gates.heads import register_head\n"
        "if TYPE_CHECKING:\n    from ..training import trainer\n"
        "def f():\n    from ..cli.app import main\n"
    )
    edges = _edges("consensus_gates.fx.insert", ROOT / "fx" / "insert.py", source)
    assert edges == {
        "consensus_gates.fx", "consensus_gates.fx.tracing", "consensus_gates.gates.heads",
        "consensus_gates.cli.app",
    }
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_core_never_imports_training_benchmarks_experiments_or_the_cli():
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name != PACKAGE and not _is_outer(name)
        for target in targets
        if _is_outer(target)
    )
    assert wrong == []


def _long_functions() -> list[str]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                length = node.end_lineno - start + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def test_no_function_is_longer_than_80_lines():
    assert _long_functions() == []


@pytest.mark.parametrize("folder", ["fx", "gates", "saving", "training", "bench", "cli"])
def test_the_layout_shows_the_pipeline(folder):
    assert (ROOT / folder / "__init__.py").exists()
    assert not (ROOT / f"{folder}.py").exists()
