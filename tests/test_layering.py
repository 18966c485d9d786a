"""The package's import structure: the compiler is a one-way stack (no import circle, no
import inside a function to dodge one), and data flows one way between the packages
(``qcircuit`` imports neither the compiler nor the runtime; the compiler never the runtime)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qcircuit": "qcircuit", "compiler": "qcircuit.compiler",
            "runtime": "qcircuit.runtime", "peft_method": "qcircuit.peft"}


def _imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every import of
    ``path`` that names a qcircuit module, relative imports resolved."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, id(node) in inside) for n in names if n.split(".")[0] == "qcircuit"]
    return out


def _graph(folder: str) -> tuple[nx.DiGraph, list[str]]:
    package = PACKAGES[folder]
    g, inner = nx.DiGraph(), []
    for path in sorted((ROOT / folder).glob("*.py")):
        me = package if path.stem == "__init__" else f"{package}.{path.stem}"
        g.add_node(me)
        for target, in_function in _imports(path, package):
            if target.startswith(package + ".") and target.count(".") > package.count(".") + 1:
                target = target.rsplit(".", 1)[0]  # ``from .x import name``: the module x
            g.add_edge(me, target)
            if in_function and target.startswith(package):
                inner.append(f"{me} -> {target}")
    return g, inner


def test_the_compiler_is_a_one_way_stack():
    g, inner = _graph("compiler")
    inside = g.subgraph([n for n in g if n.startswith("qcircuit.compiler.")])
    assert list(nx.simple_cycles(inside)) == []
    assert inner == [], "imports inside functions"
    assert nx.is_directed_acyclic_graph(inside)


@pytest.mark.parametrize("folder, forbidden", [
    ("qcircuit", ("qcircuit.compiler", "qcircuit.runtime", "qcircuit.peft")),
    ("compiler", ("qcircuit.runtime", "qcircuit.peft"))])
def test_data_flows_one_way_between_packages(folder, forbidden):
    g, _ = _graph(folder)
    bad = [(a, b) for a, b in g.edges if b.startswith(forbidden)]
    assert bad == []


def test_the_check_sees_what_it_looks_for(tmp_path):
    """The import reader finds a function-level import and the graph a circle (the tests
    above can fail)."""
    assert list(nx.simple_cycles(nx.DiGraph([("a", "b"), ("b", "a")])))
    path = tmp_path / "probe.py"
    path.write_text("from . import routes\ndef f():\n    from .tuning import Tuning\n")
    assert _imports(path, "qcircuit.compiler") == [("qcircuit.compiler.routes", False),
                                                    ("qcircuit.compiler.tuning", True)]
