"""2x2 DiT ablation: timestep sampling (logit-normal vs uniform) x loss weighting (none vs cosmap).

Run all four (skips finished runs, resumes interrupted ones) and write the report:
    python -m launch.sweep experiments/ablation_sweep.py --workdir_root workdirs/sweeps
Tiny CPU version (4 runlocal runs, a few minutes on 2 cores):
    python -m launch.sweep experiments/ablation_sweep.py:runlocal --workdir_root workdirs/sweeps
Print the commands instead (or wrap them for a cluster with --launcher=tpu_pod / --launcher=slurm):
    python -m launch.sweep experiments/ablation_sweep.py --dry_run
Report again from what is on disk:
    python -m launch.report workdirs/sweeps/ablation_tsampling_x_weighting
"""

from __future__ import annotations

from launch.sweep import Sweep, product


def get_sweep(arg: str | None = None) -> Sweep:
    """The 4-run sweep over `ablation.py` (`arg="runlocal"`: its tiny variant)."""
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"experiments/ablation_sweep.py: unknown arg {arg!r}; use '' or 'runlocal'")
    runlocal = arg == "runlocal"
    return Sweep(
        name="ablation_tsampling_x_weighting" + ("_runlocal" if runlocal else ""),
        base="ablation.py" + (":runlocal" if runlocal else ""),
        runs=product({"dit.timestep_sampling": ["logit_normal", "uniform"], "dit.loss_weighting": ["none", "cosmap"]}),
    )
