"""Package structure: no import cycles between interp_fer's modules, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import interp_fer

ROOT = Path(interp_fer.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions too), except under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # only the runtime branch
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             known: set[str]) -> set[str]:
    """The interp_fer modules a statement imports (a name that is a submodule counts as it)."""
    if isinstance(statement, ast.Import):
        bases = [alias.name for alias in statement.names]
        names: list[str] = []
    else:
        if statement.level:
            package = module.split(".")
            if not is_package:
                package = package[:-1]
            package = package[:len(package) - (statement.level - 1)]
            base = ".".join(package + ([statement.module] if statement.module else []))
        else:
            base = statement.module or ""
        bases = [base]
        names = [alias.name for alias in statement.names]
    targets = set()
    for base in bases:
        for name in names or [""]:
            candidate = f"{base}.{name}" if name else base
            if candidate in known:
                targets.add(candidate)
            elif base in known:
                targets.add(base)
    return targets


def import_graph() -> dict[str, set[str]]:
    """interp_fer module -> the interp_fer modules it imports (itself left out)."""
    files = {_module_name(path): path for path in ROOT.rglob("*.py")}
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = {target for statement in _imports(tree)
                         for target in _targets(statement, module, is_package, known)
                         if target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_the_cycle_finder_finds_cycles_and_lazy_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                     "def f():\n    from .c import g\n    from . import d\n")
    known = {"p", "p.a", "p.b", "p.c", "p.d"}
    found = set().union(*(_targets(s, "p.a", False, known) for s in _imports(tree)))
    assert found == {"p.c", "p.d"}


def test_interp_fer_has_no_import_cycles():
    graph = import_graph()
    assert {"interp_fer.layers", "interp_fer.projections.api", "interp_fer.autograd_graph"} \
        <= set(graph)
    assert "interp_fer.layers" in graph["interp_fer.models"]  # function-level imports count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_subpackage_is_installed():
    # setup.cfg lists packages by name: a new subpackage left out imports from a checkout
    # (editable install) but not from a wheel.
    import configparser

    config = configparser.ConfigParser()
    repo = Path(__file__).resolve().parents[1]
    config.read(repo / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(repo).parts)
             for p in (repo / "interp_fer").rglob("__init__.py")}
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
