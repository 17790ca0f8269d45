"""The import graph of the project's packages: no cycles (counting imports inside functions too),
and the layering launch -> methods -> common, with no method importing another."""

import ast
import os

import pytest

from tests.conftest import REPO

PACKAGES = ("common", "gan", "learned_optimizers", "maml", "nas", "launch")
METHODS = ("gan", "learned_optimizers", "maml", "nas")


def module_files() -> dict[str, str]:
    """{dotted module name: path} of every module of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its code (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imported_modules(p, known) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package):
    """common imports no method and no launcher; a method imports common and itself only."""
    allowed = {"common": {"common"}, "launch": set(PACKAGES)}.get(package, {"common", package})
    for module, imports in import_graph().items():
        if module.split(".")[0] == package:
            wrong = sorted(i for i in imports if i.split(".")[0] not in allowed)
            assert not wrong, f"{module} imports {wrong}"
