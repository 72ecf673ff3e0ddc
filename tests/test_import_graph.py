"""The package's import graph is a tree of layers: no cycle among cblr_ext's modules
(imports inside functions included), the op contract a leaf, and the optimizer naming no
backend.  Read from the sources (ast), so a late import cannot hide a cycle."""
import ast
import re
from pathlib import Path

import cblr_ext

PACKAGE = Path(cblr_ext.__file__).resolve().parent
ROOT = PACKAGE.parent
# setup.py's package_dir: cblr_ext.kernels lives in kernels/
SOURCES = {"cblr_ext": PACKAGE, "cblr_ext.kernels": ROOT / "kernels"}


def _modules() -> dict:
    """{dotted name: path} of every module of the package."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "cblr_ext" and parts[:1] == ["kernels"]:
                continue
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """The package modules ``name`` imports (``from . import x`` of a module counts as x)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import mod`` imports mod (and runs pkg's __init__, which the walk
            # reaches through mod's own parent); ``from mod import name`` imports mod
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # the deepest package module the target names
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict):
    """A cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_the_known_edges():
    graph = _graph()
    assert "cblr_ext.contract" in graph["cblr_ext.ops"]
    assert "cblr_ext.backends" in graph["cblr_ext.functional"]
    assert "cblr_ext.kernels.chunks" in graph["cblr_ext.backends.triton"]  # an import inside a function
    assert "cblr_ext.ops" in graph["cblr_ext.backends.reference"]


def test_the_walk_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    assert _cycle(_graph()) is None


def test_the_op_contract_is_a_leaf():
    assert _graph()["cblr_ext.contract"] == set()
    assert _graph()["cblr_ext.layer_math"] == set()


def test_the_optimizer_names_no_backend():
    graph = _graph()
    assert not {m for m in graph["cblr_ext.optimizer"] if m.startswith("cblr_ext.backends.")}
    source = (PACKAGE / "optimizer.py").read_text()
    names = "|".join(cblr_ext.backends.NAMES)
    assert re.findall(rf"\b({names})\b", source) == []
