"""The package graph flows one way: data -> models -> train -> eval -> export, entry points on top.

Parses every import (module-level and inside functions) of `klingjax/`, `data_pipelines/` and `launch/` and
fails on an import cycle between modules or on an import against the layer order below. The checker itself is
tested on the cycles the codebase once had, so a regression cannot pass silently.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("klingjax", "data_pipelines", "launch")

# Lowest first. A module may import its own unit or a strictly lower layer; units of one layer are independent.
LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves: weights, meshes, math (diffusion schedules and samplers; measures: the PSNR train and eval share)
    ("klingjax", "klingjax.assets", "klingjax.sharding", "klingjax.diffusion", "klingjax.measures"),
    ("klingjax.data",),  # records, Grain pipeline, synthetic clips, tokenizers
    ("klingjax.models",),  # DiT, VAE, text encoders, Conditions
    ("klingjax.config_stages",),  # the train-stage sections of the config (re-exported by klingjax.config)
    ("klingjax.config",),  # ConfigDict -> validated frozen dataclasses
    ("klingjax.layout",),  # work-dir paths, experiment -> model configs, latent stats
    ("klingjax.train",),  # stages, step, loop, checkpoints
    ("klingjax.eval", "data_pipelines"),  # generation + metrics; offline converters and the latent cache
    ("klingjax.export", "klingjax.plan"),  # to/from diffusers; pod-scale step/memory predictions
    ("klingjax.experiment",),  # orchestration of the stages
    ("klingjax.main", "launch"),  # entry points
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layer unit of a dotted module: `klingjax.<sub>` or the top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "klingjax" and len(parts) > 1 else parts[0]


def project_modules(repo: pathlib.Path = REPO) -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module under ROOTS."""
    out = {}
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            name = ".".join(path.relative_to(repo).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (`from pkg import mod` resolves to pkg.mod)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets.update(subs or {node.module})  # `from pkg import mod` imports pkg.mod
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer to a higher or equal one of another unit."""
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            a, b = unit_of(src), unit_of(dst)
            if a == b:
                continue
            if a not in RANK or b not in RANK:
                bad.append(f"{src} -> {dst}: unit {a if a not in RANK else b} has no layer in LAYERS")
            elif RANK[b] >= RANK[a]:
                bad.append(f"{src} (layer {RANK[a]}) imports {dst} (layer {RANK[b]})")
    return bad


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return import_edges(project_modules())


def test_no_import_cycles(edges):
    assert import_cycles(edges) == []


def test_imports_follow_the_layers(edges):
    assert layering_violations(edges) == []
    assert all(unit_of(m) in RANK for m in edges), sorted({unit_of(m) for m in edges} - set(RANK))


@pytest.mark.parametrize("cycle", [
    # The cycles of the hub `klingjax.train` before the structure refactor (issue 14).
    [("data_pipelines.cache_latents", "klingjax.train.experiment"),
     ("klingjax.train.experiment", "data_pipelines.cache_latents")],
    [("klingjax.train.loop", "klingjax.export.importer"), ("klingjax.export.importer", "klingjax.export.export"),
     ("klingjax.export.export", "klingjax.train.stages"), ("klingjax.train.stages", "klingjax.train.loop")],
    [("klingjax.models.text_encoders", "klingjax.models.umt5"),
     ("klingjax.models.umt5", "klingjax.models.text_encoders")],
    [("klingjax.config", "klingjax.train.vae_losses"), ("klingjax.train.vae_losses", "klingjax.train.step"),
     ("klingjax.train.step", "klingjax.config")],
])
def test_the_checker_catches_the_old_cycles(cycle):
    edges: dict[str, set[str]] = {}
    for src, dst in cycle:
        edges.setdefault(src, set()).add(dst)
    assert import_cycles(edges), cycle
    if any(unit_of(a) != unit_of(b) for a, b in cycle):
        assert layering_violations(edges), cycle  # a cross-package cycle always breaks the layer order too


def test_the_checker_resolves_from_package_imports(tmp_path):
    (tmp_path / "klingjax" / "models").mkdir(parents=True)
    (tmp_path / "klingjax" / "__init__.py").write_text("")
    (tmp_path / "klingjax" / "layout.py").write_text("")
    (tmp_path / "klingjax" / "models" / "__init__.py").write_text("")
    (tmp_path / "klingjax" / "models" / "dit.py").write_text("def f():\n    from klingjax import layout\n")
    for root in ROOTS[1:]:
        (tmp_path / root).mkdir()
    edges = import_edges(project_modules(tmp_path))
    assert edges["klingjax.models.dit"] == {"klingjax.layout"}
    assert layering_violations(edges) == ["klingjax.models.dit (layer 2) imports klingjax.layout (layer 5)"]


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The unit-level graph (`klingjax.<sub>` / top-level package) of a module graph."""
    graph: dict[str, set[str]] = {}
    for src, targets in edges.items():
        graph.setdefault(unit_of(src), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(src))
    return graph


if __name__ == "__main__":  # python tests/test_layering.py [REPO]: print the package graph, cycles, violations
    import sys

    found = import_edges(project_modules(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REPO))
    for unit, targets in sorted(package_graph(found).items(), key=lambda kv: (RANK.get(kv[0], -1), kv[0])):
        print(f"{unit:24s} -> {', '.join(sorted(targets, key=lambda u: (RANK.get(u, -1), u))) or '-'}")
    print("module cycles:", import_cycles(found) or "none")
    print("layer violations:", *(layering_violations(found) or ["none"]), sep="\n  ")
