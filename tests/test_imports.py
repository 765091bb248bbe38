"""The layers point one way: no import cycle between the project's modules (pipeline/, stages/), and
every import goes down the layers of ARCHITECTURE.md's module map, which lists every module.

Read with ast (nothing is imported). A module-level import (anything executed when the module is
imported: top level, class bodies, `try`/`if` blocks, but not `if TYPE_CHECKING:`) is an edge to
the module it names (`from pkg import mod` names pkg.mod; `from pkg import name` names pkg). The
implicit run of a parent package's __init__ is not an edge: a package that re-exports its
submodules is not a knot. Imports inside functions are listed separately: they
must not close a cycle either (a cycle hidden in a function is still a knot; only optional or heavy
third-party modules are imported lazily, never to dodge a project cycle).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> tuple[list[ast.AST], list[ast.AST]]:
    """(module-level imports, imports inside functions)."""
    top: list[ast.AST] = []
    inner: list[ast.AST] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit_one(c, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            (inner if in_function else top).append(child)
        visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def _targets(node: ast.AST, module: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    if isinstance(node, ast.ImportFrom):
        base, members = names[0], names[1:]
        out |= {m for m in members if m in mods}
        if base in mods and any(m not in mods for m in members):
            out.add(base)
        return out
    for name in names:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):  # `import a.b.c` names a.b.c (or its nearest package)
            cand = ".".join(parts[:k])
            if cand in mods:
                out.add(cand)
                break
    return out


def import_graph(include_functions: bool) -> dict[str, set[str]]:
    mods = project_modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        top, inner = _imports(ast.parse(path.read_text(), str(path)))
        edges: set[str] = set()
        for node in top + (inner if include_functions else []):
            edges |= _targets(node, mod, path.name == "__init__.py", mods)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_walker_sees_a_cycle():
    """The check itself can fail: a two-module knot is found, a chain is not."""
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    import z\nclass C:\n    import w\n")
    top, inner = _imports(tree)
    assert [a.names[0].name for a in top] == ["x", "w"]
    assert [a.names[0].name for a in inner] == ["z"]


def test_the_walker_sees_the_project():
    graph = import_graph(include_functions=False)
    assert "pipeline.run.supervisor" in graph and "stages.decode" in graph
    assert "pipeline.worker.loop" in graph["pipeline.run.supervisor"]
    assert "pipeline.wire.transport" in graph["pipeline.worker.loop"]  # `from pipeline.wire import transport`


def test_no_module_level_import_cycle():
    cycles = find_cycles(import_graph(include_functions=False))
    assert cycles == [], f"module-level import cycles: {cycles}"


def test_no_import_cycle_hidden_in_functions():
    cycles = find_cycles(import_graph(include_functions=True))
    assert cycles == [], f"import cycles (counting imports inside functions): {cycles}"


# -- the module map of ARCHITECTURE.md: every module listed once, imports only downwards ------------

MAP_ROW = re.compile(r"^\| (\d+) \| `((?:pipeline|stages)/[\w/]+\.py)` \| (.+?) \|$")


def module_map() -> dict[str, int]:
    """ARCHITECTURE.md's module map: module name -> layer (rows `| N | `path.py` | purpose |`)."""
    layers: dict[str, int] = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        m = MAP_ROW.match(line)
        if m:
            parts = list(Path(m.group(2)).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            assert name not in layers, f"{m.group(2)} is listed twice in ARCHITECTURE.md's module map"
            layers[name] = int(m.group(1))
    return layers


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return sorted(f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
                  for a, bs in graph.items() for b in bs if layers[b] > layers[a])


def test_the_map_check_can_fail():
    assert upward_imports({"a": {"b"}, "b": set()}, {"a": 1, "b": 2}) == ["a (layer 1) imports b (layer 2)"]
    assert upward_imports({"a": {"b"}, "b": set()}, {"a": 2, "b": 2}) == []


def test_every_module_is_in_the_map():
    listed, present = set(module_map()), set(project_modules())
    assert present - listed == set(), "modules missing from ARCHITECTURE.md's module map"
    assert listed - present == set(), "modules in ARCHITECTURE.md's module map that do not exist"


def test_imports_point_down_the_map():
    assert upward_imports(import_graph(include_functions=True), module_map()) == []
