"""Search meshes x rule presets x remat policies for one config and chip count; rank what fits by step time.

Candidates: every (data, fsdp, context, tensor) factorisation of the chip count whose data x fsdp divides the
global batch, tensor divides the heads (and stays inside one NVLink node on GPUs), context divides the tokens
per clip; paired with the preset that uses exactly those axes (dp: data only; fsdp: data x fsdp; fsdp_tp: +
tensor; fsdp_cp: + context) and each remat policy. Candidates whose optimiser state alone exceeds the chip's
memory are dropped before compiling (exact per-device state bytes, no compile); the rest are compiled (shared
compile meshes compile once, see roofline.estimate) up to `max_compiles`, costed, and split into fitting
(ranked by predicted step time) and rejected.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from klingjax import layout
from klingjax.config import ExperimentConfig
from klingjax.plan import roofline
from klingjax.plan.chips import Chip
from klingjax.sharding.rules import MESH_AXES

REMATS = ("none", "dots_saveable", "full")
PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_cp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def preset_for(sizes: dict[str, int]) -> str:
    """The rule preset that uses exactly the mesh axes larger than 1."""
    if sizes["context"] > 1:
        return "fsdp_cp"
    if sizes["tensor"] > 1:
        return "fsdp_tp"
    return "fsdp" if sizes["fsdp"] > 1 else "dp"


def candidates(exp: ExperimentConfig, chip: Chip, num_chips: int, presets=PRESETS, remats=REMATS,
               max_context: int = 8, max_tensor: int = 8) -> list[tuple[dict[str, int], str, str]]:
    """(mesh sizes, preset, remat) triples valid for this config and chip count (see module doc)."""
    cfg = layout.dit_model_config(exp, 1)
    t, h, w, _ = layout.latent_grid(exp)
    tokens = math.prod(s // p for s, p in zip((t, h, w), cfg.patch_size))
    out = []
    for tensor in _divisors(num_chips):
        if tensor > max_tensor or cfg.num_heads % tensor or (not chip.is_tpu and tensor > chip.node_size):
            continue
        for context in _divisors(num_chips // tensor):
            if context > max_context or tokens % context or (context > 1 and cfg.num_heads % (context * tensor)):
                continue
            for fsdp in _divisors(num_chips // (tensor * context)):
                data = num_chips // (tensor * context * fsdp)
                if exp.dit.batch_size % (data * fsdp):
                    continue
                sizes = dict(zip(MESH_AXES, (data, fsdp, context, tensor)))
                preset = preset_for(sizes)
                if preset in presets:
                    out.extend((sizes, preset, r) for r in remats)
    return out


def with_choice(exp: ExperimentConfig, sizes: dict[str, int], preset: str, remat: str) -> ExperimentConfig:
    """`exp` with the mesh, rule preset and remat policy of one candidate."""
    dit = dataclasses.replace(exp.dit, sharding=preset, model_overrides={**exp.dit.model_overrides, "remat": remat})
    return dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, **sizes), dit=dit)


def search(exp: ExperimentConfig, chip: Chip, num_chips: int, devices: list[jax.Device], *, presets=PRESETS,
           remats=REMATS, max_compiles: int = 8, cache: dict | None = None
           ) -> tuple[list[roofline.Plan], list[tuple[str, str]]]:
    """(plans that fit, fastest first; [(candidate, why rejected)]) for `exp` on `num_chips` x `chip`."""
    fitting, rejected, cache = [], [], {} if cache is None else cache
    pool, abstract = [], roofline.abstract_trainer(exp)  # remat and presets don't change the state's shapes
    for sizes, preset, remat in candidates(exp, chip, num_chips, presets, remats):
        name = f"{' '.join(f'{k}={v}' for k, v in sizes.items())} {preset} remat={remat}"
        state = sum(roofline.target_state_bytes(with_choice(exp, sizes, preset, remat), sizes, abstract).values())
        if state > chip.hbm_bytes:
            rejected.append((name, f"state alone {state / 2**30:.1f} GiB > {chip.hbm_bytes / 2**30:.1f} GiB"))
        else:
            pool.append((state, sizes, preset, remat, name))
    # Most promising first: remat none before dots_saveable before full, then the least state per device.
    pool.sort(key=lambda c: (REMATS.index(c[3]) if c[3] in REMATS else 9, c[0]))
    for i, (_, sizes, preset, remat, name) in enumerate(pool):
        if i >= max_compiles:
            rejected.append((name, f"not compiled (--max_compiles {max_compiles})"))
            continue
        plan = roofline.estimate(with_choice(exp, sizes, preset, remat), chip, num_chips, sizes, devices, cache)
        if plan.fits:
            fitting.append(plan)
        else:
            rejected.append((name, f"peak {plan.peak_flash / 2**30:.2f} GiB > {chip.hbm_bytes / 2**30:.2f} GiB "
                                   f"(predicted step {plan.step_s:.3f} s)"))
    return sorted(fitting, key=lambda p: p.step_s), rejected
