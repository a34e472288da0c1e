"""Per-token timesteps vs channel concat: the two ways given latents enter the DiT, at equal compute (issue 15).

Both runs train `kling.py` (same data, VAE, DiT size, steps, task mixture and seed); only
`dit.model_overrides.conditions.masked_video` differs. Each run's report.md holds its per-task card; the sweep
report puts the task metrics side by side with plots:
    python -m launch.sweep experiments/kling_modes_sweep.py --workdir_root workdirs/sweeps
    python -m launch.report workdirs/sweeps/kling_masked_video_modes
Tiny CPU version:
    python -m launch.sweep experiments/kling_modes_sweep.py:runlocal --workdir_root /tmp/sweeps
"""

from __future__ import annotations

from experiments.kling import MODES
from launch.sweep import Sweep, product


def get_sweep(arg: str | None = None) -> Sweep:
    """The 2-run sweep over `kling.py` (`arg="runlocal"`: its tiny variant)."""
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"experiments/kling_modes_sweep.py: unknown arg {arg!r}; use '' or 'runlocal'")
    runlocal = arg == "runlocal"
    return Sweep(
        name="kling_masked_video_modes" + ("_runlocal" if runlocal else ""),
        base="kling.py" + (":runlocal" if runlocal else ""),
        runs=product({"dit.model_overrides.conditions.masked_video": list(MODES)}),
        # Each run writes its own (seeded, identical) dataset: a run dir is self-contained, so a finished kling.py
        # work dir's data/, vae/ and latents/ can seed the runs (both then train only the DiT, on the same latents).
        share_data=False,
    )
