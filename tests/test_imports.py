"""The import graph of `src/ft`: no cycles among module-level imports, and no
family-specific module imported from the family-agnostic layers."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import ft

SRC = Path(ft.__file__).resolve().parent
GENERIC_PACKAGES = ("ft.recipes", "ft.generation", "ft.training")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _target(module: str, name: str | None) -> str:
    """The module an import statement loads: `from a.b import c` is `a.b.c` when that is a module."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {_target(node.module, alias.name) for alias in node.names}
    return {name for name in found if name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_module_level_imports_have_no_cycle():
    graph = {module: _imports(module, top_level_only=True) for module in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _family_packages() -> set[str]:
    return {_module_name(p.parent) for p in SRC.glob("models/*/family.py")}


def test_generic_layers_import_no_family_module():
    families = _family_packages()
    assert "ft.models.llama" in families
    offenders = []
    for module in MODULES:
        if not module.startswith(GENERIC_PACKAGES):
            continue
        for imported in _imports(module, top_level_only=False):
            if any(imported == f or imported.startswith(f + ".") for f in families):
                offenders.append(f"{module} imports {imported}")
    assert offenders == []


def test_benchmarks_import_no_family_module():
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    families = _family_packages()
    offenders = []
    for path in sorted(benchmarks.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name} imports {n}" for n in names
                          if any(n == f or n.startswith(f + ".") for f in families)]
    assert offenders == []


def test_model_modules_have_no_cycle_even_through_function_level_imports():
    # Family folders import only the bundle, never the lookups that register them.
    graph = {m: {i for i in _imports(m, top_level_only=False) if i.startswith("ft.models")}
             for m in MODULES if m.startswith("ft.models")}
    assert _cycles(graph) == []


@pytest.mark.parametrize("package", ["ft.models", "ft.lora", "ft.generation"])
def test_lazily_re_exported_names_resolve(package):
    # These packages import their names on first use (`ft.lazy_exports`): a name missing
    # from the table or pointing at the wrong module shows only here. A name that is also
    # a submodule's would become that submodule once anything imports it.
    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    for name in module.__all__:
        assert name not in submodules, name
        assert getattr(module, name).__module__.startswith(package + "."), name
