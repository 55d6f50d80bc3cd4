"""The package layout: no import circles, the pipeline apart from the training side, one node per
module, and the recipes the registry finds by entry point. Read from the source with ``ast``
(every import counts: module level, inside functions and under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "recipes")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The project modules ``module`` imports (``from a import b``: ``a.b`` when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out |= {name for name in names if name in MODULES and name != module}
    return out


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_in_a_circle():
    assert len(GRAPH) > 40 and sum(map(len, GRAPH.values())) > 100  # the graph was read
    assert _cycles(GRAPH) == []


def test_the_pipeline_imports_neither_the_training_side_nor_the_recipes():
    pipeline = [m for m in MODULES if m.startswith("flows")  # ``python -m flows`` runs the CLI
                and not m.startswith(("flows.training", "flows.__main__"))]
    wrong = {m: sorted(i for i in GRAPH[m] if i.startswith(("flows.training", "recipes")))
             for m in pipeline}
    assert {m: i for m, i in wrong.items() if i} == {}
    training = [m for m in MODULES if m.startswith("flows.training")]
    assert not [m for m in training if any(i.startswith("recipes") for i in GRAPH[m])]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("flows.nodes.")))
def test_one_node_per_module(module: str):
    tree = ast.parse(MODULES[module].read_text())
    nodes = [c.name for c in tree.body if isinstance(c, ast.ClassDef)
             and any(ast.unparse(b).startswith("BaseNode") for b in c.bases)]
    assert len(nodes) <= 1, nodes


def test_every_registered_recipe_is_declared_as_an_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"]["flows.recipes"]
    registered = {}
    for module in (m for m in MODULES if m.startswith("recipes.")):
        for c in ast.parse(MODULES[module].read_text()).body:
            if isinstance(c, ast.ClassDef) and any(ast.unparse(d) == "register" for d in c.decorator_list):
                registered[f"{module}:{c.name}"] = next(
                    s.value.value for s in c.body if isinstance(s, ast.Assign)
                    and ast.unparse(s.targets[0]) == "name")
    assert registered and {name: target for target, name in registered.items()} == declared
