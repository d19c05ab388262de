"""No module of gradstream imports itself back through others, not even lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import gradstream


def _modules() -> dict[str, Path]:
    """Every gradstream module (generated stubs included) and its source file.

    Found by walking the namespace package's directories: ``gradstream.server`` has no
    ``__init__`` for ``pkgutil`` to descend through.
    """
    found: dict[str, Path] = {}
    for root in map(Path, gradstream.__path__):
        for path in root.rglob("*.py"):
            parts = ("gradstream", *path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gradstream modules ``path`` imports anywhere (functions too), but for type checks."""
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(ast.parse(path.read_text(), str(path)))
    return {t for t in targets if t in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
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
            connect(node)
    return found


def test_the_module_graph_has_no_cycle() -> None:
    modules = _modules()
    assert "gradstream.server.engine" in modules and "gradstream.client._client" in modules
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_a_cycle_is_found() -> None:
    """The check can fail: a lazy import back, inside a function, is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    source = "def f() -> None:\n    from gradstream.server import main\n"
    tree_modules = {"gradstream.server.main": Path("main.py")}
    path = Path(__file__).with_name("_cycle_probe.py")
    path.write_text(source)
    try:
        assert _imports(path, tree_modules) == {"gradstream.server.main"}
    finally:
        path.unlink()
