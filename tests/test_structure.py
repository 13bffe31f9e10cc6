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

    from modelctl.host.identity import identity_of
    from modelctl.host.process import alive_in, process_table

    table = process_table()
    me = psutil.Process()
    row = table[me.pid]
    assert row.ppid == me.ppid() and row.pgid == os.getpgid(me.pid) and not row.zombie
    assert abs(row.create_time - me.create_time()) <= 0.05 and alive_in(table, identity_of(me.pid))
    assert abs(row.rss - me.memory_info().rss) < 16 * 2**20


# The layers, lowest first. A module may import its own layer and those below, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "vocabulary",
        (
            "modelctl",
            "modelctl.errors",
            "modelctl.names",
            "modelctl.served_names",
            "modelctl.sanitize",
            "modelctl.failures",
            "modelctl.spec",
            "modelctl.yamlfile",
            "modelctl.units",
        ),
    ),
    ("host", ("modelctl.host", "modelctl.backends", "modelctl.launchers")),
    ("state", ("modelctl.state",)),
    ("profile", ("modelctl.profile",)),
    ("observe", ("modelctl.observe",)),
    ("supervisor", ("modelctl.supervisor",)),
    ("cluster", ("modelctl.cluster",)),
    ("control", ("modelctl.control",)),
    ("foreground", ("modelctl.foreground",)),
    ("cli", ("modelctl.cli", "modelctl.__main__")),
]


def layer_of(module: str) -> int:
    """The layer of a module: the longest prefix that names one (a package names its modules)."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS in tests/test_structure.py"
    return found


def test_a_lower_layer_never_imports_a_higher_one():
    graph = import_graph()
    upward = [
        f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for mod, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(mod)
    ]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a host module that imports the supervisor is reported."""
    graph = {"modelctl.host.x": {"modelctl.supervisor.core"}, "modelctl.supervisor.core": {"modelctl.host.x"}}
    assert [m for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)] == ["modelctl.host.x"]


def test_every_module_says_what_it_owns():
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__main__.py" and ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert missing == []


def test_no_folder_of_modelctl_is_a_heap_of_modules():
    """Folders name the parts: a flat heap (35 modules in modelctl/ before) is what the layout replaced."""
    crowded = {
        str(d.relative_to(ROOT)): n
        for d in [PACKAGE, *[p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"]]
        if (n := len(list(d.glob("*.py")))) > 16
    }
    assert crowded == {}


HEAVY = {"torch", "sentence_transformers", "fastapi", "transformers"}


def test_modelctl_itself_never_imports_torch_sentence_transformers_or_fastapi():
    """Only server processes load them; the CLI and the supervisor stay light (a static check of
    every import statement; tests/test_cli.py checks what a real `modelctl` process loads)."""
    heavy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            heavy += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert heavy == []
