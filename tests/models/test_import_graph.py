"""The import graph of ``src/genserve``: no cycles, and models never import the app.

Edges come from the source with ``ast``: every ``import`` and ``from ... import`` at module level or
inside a function counts, whether it runs at import time or later; ``if TYPE_CHECKING:`` blocks do
not (they never run). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
to ``pkg``. Importing a submodule also runs its packages' ``__init__``, which is an edge too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import genserve

ROOT = Path(genserve.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = _resolve(module, node)
        names = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    out = set()
    for name in names:
        while name and name not in MODULES:  # ``import genserve.models.x.y`` where only part is ours
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & MODULES.keys()


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, node):
                edges |= {target} | _parents(target)
        graph[module] = edges - {module} - _parents(module)  # a package's own __init__ runs first anyway
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None: depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_real_edges() -> None:
    graph = import_graph()
    assert "genserve.models.registry" in graph["genserve.cli"]
    assert "genserve.models.common.training" in graph["genserve.models.image.gan"]  # module level
    assert "genserve.models.image.train" in graph["genserve.models.image.gan"]  # inside a function
    assert "genserve.models.common" in graph["genserve.models.image.gan"]  # a package's __init__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_models_never_import_the_app() -> None:
    offenders = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if m.startswith("genserve.models")
                       for t in targets if t.startswith("genserve.app"))
    assert not offenders, offenders
