"""The layers of vlmlab (docs/architecture.md): the core never imports the simulator, arrows point down, no cycles.

Imports are read from the source (at any depth: a lazy import inside a function counts too), so a
violation fails here before it can hide behind an import order that happens to work.
"""
import ast
from pathlib import Path

import pytest
from conftest import imports_in

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vlmlab"
# each top-level part of vlmlab and its layer: an import may only go to a lower layer (or stay inside its part)
LAYERS = {
    "io": 0, "cpu_gemm": 0, "seeding": 0, "batching": 0,
    "params": 1, "determinism": 1, "data": 1, "models": 1, "monitor": 1, "evaluate": 1,
    "synth": 2, "train": 2,
    "infer": 3,
    "sim": 4,   # the tiny world: it writes the real path's inputs and may use the whole core; nothing uses it
}
CORE = [part for part in LAYERS if part != "sim"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path) -> set[str]:
    """The vlmlab modules `name` imports: `from a.b import c` is a.b.c where that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for mod, names in imports_in(ast.parse(path.read_text(encoding="utf-8")), package):
        found |= {f"{mod}.{n}" if f"{mod}.{n}" in MODULES else mod for n in names} if names else {mod}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def part(name: str) -> str:
    return name.split(".")[1]


def test_every_part_of_vlmlab_has_a_layer():
    assert {part(n) for n in MODULES if n != "vlmlab"} <= set(LAYERS), "add the new part to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_the_simulator(core):
    bad = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a != "vlmlab" and part(a) == core
                 for b in targets if part(b) == "sim")
    assert not bad, f"vlmlab.{core} imports the simulator (it must read only real-format artifacts): {bad}"


def test_imports_point_down_the_layers():
    up = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a != "vlmlab" for b in targets
                if part(a) != part(b) and LAYERS[part(b)] >= LAYERS[part(a)])
    assert not up, f"imports that go up or sideways between layers: {up}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_under_vlmlab():
    assert not cycles(GRAPH), f"import cycles: {cycles(GRAPH)}"


def test_the_checks_catch_what_they_guard(tmp_path):
    """A planted cycle is found, and a lazy or relative import of the simulator is read as one."""
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["vlmlab.sim.vocab"].add("vlmlab.sim.text")
    assert any({"vlmlab.sim.text", "vlmlab.sim.vocab"} <= set(c) for c in cycles(planted))
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from vlmlab.sim import world\n    from ..sim.text import corpus_words\n")
    assert imports_of("vlmlab.data.fake", fake) == {"vlmlab.sim.world", "vlmlab.sim.text"}
