"""The import contract of the layout (DESIGN.md, README "Layout"), checked on the source with ``ast``.

Layers, bottom to top: the core ``sdwb`` (model zoo, loading, generation, the variant format,
registries), then the stages in data-flow order ``compress`` -> ``export`` -> ``bench``, then the
application layer ``sdwb.app`` (CLI, recipe schema and runner; ``python -m sdwb`` too), the only
code that may import every stage. The rules:

1. the core imports no stage and not the application layer;
2. a stage never imports a stage after it (compress never imports export or bench, export never
   imports bench): it reads what an earlier stage wrote through the core's variant format;
3. no stage imports the application layer;
4. no import circle between modules, lazy (function-level) imports included.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdwb", "compress", "export", "bench")
RANK = {"sdwb": 0, "compress": 1, "export": 2, "bench": 3, "app": 4}


def layer(module: str) -> str:
    if module.startswith("sdwb.app") or module == "sdwb.__main__":
        return "app"
    return module.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts a.b.c when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in known:  # a name imported from a module: the module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
             if "assets" not in p.parts}
    known = set(files)
    return {m: imports_of(p, known) - {m} for m, p in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer(module), layer(target)
            if b == a:
                continue
            if a == "sdwb":
                out.append(f"core imports {'the application layer' if b == 'app' else 'a stage'}: "
                           f"{module} -> {target}")
            elif b == "app":
                out.append(f"stage imports the application layer: {module} -> {target}")
            elif b != "sdwb" and RANK[b] > RANK[a]:
                out.append(f"stage imports a later stage: {module} -> {target}")
    return out + [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_layers_hold():
    assert violations(import_graph()) == []


@pytest.mark.parametrize("bad, expected", [
    ({"sdwb.loading": {"compress.prune"}}, "core imports a stage: sdwb.loading -> compress.prune"),
    ({"compress.prune": {"bench.memory"}}, "stage imports a later stage: compress.prune -> bench.memory"),
    ({"export.onnx": {"sdwb.app.cli"}}, "stage imports the application layer: export.onnx -> sdwb.app.cli"),
    ({"compress.a": {"compress.b"}, "compress.b": {"compress.a"}}, "import circle: compress.a -> compress.b"),
])
def test_each_rule_fails_on_a_bad_import(bad, expected):
    """Each of the import problems main had (a2ac5b5: core -> compress, compress -> bench, circles)
    is caught when it is added to today's graph."""
    graph = import_graph()
    for module, targets in bad.items():
        graph.setdefault(module, set()).update(targets)
    assert expected in violations(graph)
