"""DiT ablation base: the demo pipeline with the DiT settings an ablation sweep varies.

One run (the sweep varies dit.timestep_sampling x dit.loss_weighting, see ablation_sweep.py):
    klingjax-train --config experiments/ablation.py --workdir workdirs/ablation/base
A tiny smoke version (about a minute on 2 CPU cores):
    klingjax-train --config experiments/ablation.py:runlocal --workdir /tmp/ablation_tiny
The whole sweep, then its report:
    python -m launch.sweep experiments/ablation_sweep.py:runlocal --workdir_root workdirs/sweeps
"""

from __future__ import annotations

import ml_collections

from experiments import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Ablation base config; `arg="runlocal"` shrinks everything for tests and laptops."""
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"experiments/ablation.py: unknown arg {arg!r}; use '' or 'runlocal'")
    c = demo.get_config(arg)
    c.name = "ablation"
    # The swept settings, at their defaults (a sweep overrides them per run).
    c.dit.timestep_sampling = "logit_normal"
    c.dit.loss_weighting = "none"
    c.dit.timestep_shift = 0.0  # resolution-dependent
    # Ablations compare final quality: evaluate every run the same way, with a fixed sampling budget.
    c.sample.num_steps = 25
    c.eval.fvd = True
    if arg == "runlocal":
        c.name = "ablation_runlocal"
        c.dit.steps, c.dit.log_every = 8, 1
        c.sample.num_steps = 2
        c.eval.fvd = False  # the I3D compile dominates a tiny run
    return c
