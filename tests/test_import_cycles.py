"""No import cycles among the project's modules, counting imports inside functions (issue 13).

import-linter's contracts see layers; this test sees every module: it parses each file, resolves each
``import``/``from ... import`` (module level or not, relative or absolute) to a project module, and
fails on any strongly connected component of more than one module. Also: no module imports another
module's private (``_name``) helpers.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["trajflow", "pipeline", "trainer", "storage_schemas", "flowcore", "models", "evaluation"]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _resolve(name: str, mods) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> imported project modules; and (importer, module, private name) for private imports."""
    mods = _modules()
    graph, private = {m: set() for m in mods}, []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
                    owner = _resolve(base, mods)
                    if a.name.startswith("_") and not a.name.startswith("__") and owner and full not in mods and owner != mod:
                        private.append((mod, owner, a.name))
            for t in targets:
                r = _resolve(t, mods)
                if r and r != mod and not mod.startswith(r + "."):  # a module importing its own package is no cycle
                    graph[mod].add(r)
    return graph, private


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    sys.setrecursionlimit(10000)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def test_no_import_cycles_counting_function_level_imports():
    graph, _ = import_graph()
    assert strongly_connected(graph) == []


def test_no_private_helpers_imported_across_modules():
    _, private = import_graph()
    assert private == []


def test_the_cycle_check_bites():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    graph, _ = import_graph()
    graph["flowcore.schedules"].add("trajflow.cli")  # trajflow.cli reaches flowcore.schedules, so this closes a loop
    assert any("flowcore.schedules" in c for c in strongly_connected(graph))
