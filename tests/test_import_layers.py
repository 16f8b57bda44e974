"""The import layers of DESIGN.md: nothing imports upward, the cost model is a leaf, tools are never imported
by the library, and no import cycle exists among cp_dtensor's modules.

Layers, low to high (a module may import its own layer and any lower one)::

    0  cost                       hardware, strategy prices, activation memory (imports nothing of ours)
    1  attention, layout, balance  kernels, merge, transport, plans, layouts, masks, strategies, the CP call
    2  styles, context_parallel, sharding, parallel_dims, memory, inspect
    3  models                     plain models (attention through SDPA / document_attention), HF conversion
    4  parallelize, pipeline, train_step, checkpoint, metrics, launch
    5  trainer, config, data, cli, generation, evaluation, integrations; the model *families*
       (models.llama, models.qwen3, models.torchtitan_llama3: a model plus its parallelize and pipeline
       functions, the registry entry a trainer plugs in) and the ``cp_dtensor.models`` facade that imports them
    6  tools                      planner, benchmarks: import the library, never imported by it

Checked by parsing every module's imports (module-level and inside functions), so the test needs no extra
tool; import-linter's "layers" and "forbidden" contracts express the same rules.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cp_dtensor"

LAYERS: dict[str, int] = {
    "cost": 0,
    "attention": 1,
    "layout": 1,
    "balance": 1,
    "styles": 2,
    "context_parallel": 2,
    "sharding": 2,
    "parallel_dims": 2,
    "memory": 2,
    "sharding_table": 2,
    "models": 3,
    "parallelize": 4,
    "pipeline": 4,
    "train_step": 4,
    "checkpoint": 4,
    "metrics": 4,
    "launch": 4,
    "trainer": 5,
    "config": 5,
    "data": 5,
    "cli": 5,
    "generation": 5,
    "evaluation": 5,
    "integrations": 5,
    "tools": 6,
}

SUBMODULE_LAYERS: dict[str, int] = {
    "models.llama": 5,
    "models.qwen3": 5,
    "models.torchtitan_llama3": 5,
}
"""Modules whose layer differs from their package's (the most specific prefix wins)."""

FACADES: dict[str, int] = {"models": 5}
"""Package ``__init__`` modules that re-export higher layers (the public face of the package)."""


def _layer(module: str, is_package: bool = False) -> int | None:
    rel = module.removeprefix("cp_dtensor").removeprefix(".")
    if not rel:
        return None
    if is_package and rel in FACADES:
        return FACADES[rel]
    parts = rel.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in SUBMODULE_LAYERS:
            return SUBMODULE_LAYERS[".".join(parts[:n])]
    return LAYERS.get(parts[0])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """cp_dtensor modules ``path`` imports (absolute and relative, at any depth)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("cp_dtensor")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("cp_dtensor"):
                found.append(name)
                for alias in node.names:
                    sub = ROOT.parent / f"{name}.{alias.name}".replace(".", "/")
                    if sub.with_suffix(".py").exists() or sub.is_dir():
                        found.append(f"{name}.{alias.name}")
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, list[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_top_level_module_has_a_layer() -> None:
    tops = {_top(m) for m in _modules()} - {""}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_nothing_imports_upward() -> None:
    packages = {_module_name(p) for p in ROOT.rglob("__init__.py")}
    upward = []
    for module, imports in _modules().items():
        mine = _layer(module, module in packages)
        if mine is None:  # the package root re-exports the public API
            continue
        for target in imports:
            theirs = _layer(target, target in packages)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("leaf", ["cost"])
def test_the_cost_model_is_a_leaf(leaf: str) -> None:
    outside = [
        f"{m} imports {t}"
        for m, imports in _modules().items()
        if _top(m) == leaf
        for t in imports
        if _top(t) != leaf
    ]
    assert not outside, "\n".join(outside)


def test_no_import_cycles() -> None:
    """No cycle among modules (a module and its package's ``__init__`` count as separate nodes)."""
    known = set(_modules())
    graph = {m: {t for t in imports if t in known} for m, imports in _modules().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
