"""The package layering: no import loops between modules, and no import from a lower package to a higher one.

Static (AST) over every module of the installed packages, function-local imports included, so a lazy
import cannot hide a loop. The order below is the pipeline read bottom-up; README "Package layout" shows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolchain",)

# lowest first; a package may import packages of its own layer or below (loops are caught separately)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("toolchain", "toolchain.errors", "toolchain.defaults", "toolchain.topology", "toolchain.distributed", "toolchain.io",
     "toolchain.cpu"),
    ("toolchain.models", "toolchain.calibration", "toolchain.pipeline"),
    ("toolchain.quant",),  # the fake-quant core and the registries below the quantize_ verb
    ("toolchain.balance",),
    ("toolchain.eval",),
    ("toolchain.train",),
    ("toolchain.lowrank",),
    ("toolchain.alloc",),
    ("toolchain.methods",),
    ("toolchain.recipe",),  # recipe files, checked against the registries, metrics and the model
    ("toolchain.export", "toolchain.compare"),
    ("toolchain.profile",),  # runs exported files (and reads their signatures / stages)
    ("toolchain.commands", "toolchain.cli", "toolchain.__main__"),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module → modules of these packages it imports (anywhere in its body)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                r = resolve(t)
                if r and r != m:
                    edges[m].add(r)
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "toolchain" and len(parts) > 1 else parts[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_has_a_layer_and_imports_only_downwards():
    layer = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}
    edges = import_graph()
    missing = sorted({package_of(m) for m in edges} - set(layer))
    assert not missing, f"packages without a layer in tests/test_layering.py: {missing}"
    upward = sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
                    if layer[package_of(b)] > layer[package_of(a)])
    assert not upward, "imports from a lower package to a higher one:\n" + "\n".join(upward)
