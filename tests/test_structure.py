"""The shape of the code: modelctl's modules form a stack (no import cycles, not even through
imports inside functions or under TYPE_CHECKING), and the CLI's start-up stays light."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modelctl"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """Every modelctl module `path` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports a.b when b is a module, else a
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            # `import a.b.c` runs a/__init__ too, but an edge to the package itself is what it names
            if name in known and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_finds_imports_inside_functions(tmp_path):
    """The check itself: an import in a function body is an edge like any other."""
    (tmp_path / "modelctl").mkdir()
    a = tmp_path / "modelctl" / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\ndef f():\n    from modelctl import b\n")
    assert imports_of(a, {"modelctl.a", "modelctl.b", "modelctl.c"}, tmp_path) == {"modelctl.b", "modelctl.c"}
    graph = {"modelctl.a": {"modelctl.b"}, "modelctl.b": {"modelctl.a"}, "modelctl.c": {"modelctl.a"}}
    assert cycles(graph) == [["modelctl.a", "modelctl.b"]]


def test_modelctl_has_no_import_cycles_not_even_through_function_level_imports():
    graph = import_graph()
    assert graph.get("modelctl.cli"), "the graph must see the CLI's imports"
    assert cycles(graph) == []


def test_the_process_table_reads_what_psutil_reads():
    """The supervisor's cheap /proc reader agrees with psutil on identity, parent, group and memory."""
    import os

    import psutil

    from modelctl.identity import identity_of
    from modelctl.process import alive_in, process_table

    table = process_table()
    me = psutil.Process()
    row = table[me.pid]
    assert row.ppid == me.ppid() and row.pgid == os.getpgid(me.pid) and not row.zombie
    assert abs(row.create_time - me.create_time()) <= 0.05 and alive_in(table, identity_of(me.pid))
    assert abs(row.rss - me.memory_info().rss) < 16 * 2**20
