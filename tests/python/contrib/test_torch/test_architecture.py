"""The package's module structure: no import cycles (function-level imports included)."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import tvm.contrib.torch

PACKAGE = "tvm.contrib.torch"
ROOT = os.path.dirname(os.path.abspath(tvm.contrib.torch.__file__))


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if relative[-1] == "__init__":
        relative = relative[:-1]
    return ".".join([PACKAGE] + relative)


def _modules() -> Dict[str, str]:
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[_module_name(path)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports, at any depth of its code."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        is_package = path.endswith("__init__.py")
        edges: Set[str] = set()
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module or "") \
                    if node.level else (node.module or "")
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                # "from . import x" names a module; "from .x import y" names one inside x.
                if name in modules and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def _cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _without_package_inits(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """Edges into a package's ``__init__`` from its own submodules are how Python loads them
    (``from .partitioning.x import y`` runs ``partitioning/__init__`` first), not a
    dependency: they are dropped; every other edge stays."""
    out = {}
    for module, edges in graph.items():
        out[module] = {e for e in edges if not (module.startswith(e + ".") and e != module)}
    return out


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert f"{PACKAGE}.pipeline" in graph[f"{PACKAGE}.compiler"]
    assert f"{PACKAGE}.partitioning.driver" in graph[f"{PACKAGE}.partitioning"]


def test_package_has_no_import_cycle():
    assert _cycle(_without_package_inits(import_graph())) is None


def test_pipeline_does_not_depend_on_partitioning_or_the_facade():
    graph = _without_package_inits(import_graph())
    seen, todo = set(), [f"{PACKAGE}.pipeline"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not {m for m in seen if m.startswith(f"{PACKAGE}.partitioning")
                or m == f"{PACKAGE}.compiler"}
