"""Few-step students of the demo's teacher (issue 21): the distill stage on a finished demo work dir.

    klingjax-train --config experiments/demo.py --workdir workdirs/demo                  # the teacher (~19 min)
    klingjax-train --config experiments/distill.py:trajectory --workdir workdirs/demo     # 4-step student
    klingjax-train --config experiments/distill.py:trajectory,steps=2 --workdir workdirs/demo
    klingjax-train --config experiments/distill.py:shortcut --workdir workdirs/demo       # any step count
    klingjax-train --config experiments/distill.py:mean_flow --workdir workdirs/demo
    klingjax-generate --workdir workdirs/demo --student --prompt "a red circle moves left"
    klingjax-eval steps --workdir workdirs/demo --out workdirs/demo/steps                # step curves

Arg: METHOD[,steps=N][,iters=N][,runlocal]. The student lands in WORKDIR/distill (one student per work dir: to keep
several, give each its own work dir holding links to the teacher's data/, latents/, vae/ and dit/). The teacher and
the data are the demo's (experiments/demo.py), so its sections must match the work dir's.
"""

from __future__ import annotations

import ml_collections

from experiments import demo
from klingjax.diffusion.distill import DistillMethod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    methods = [m.value for m in DistillMethod]
    if not parts or parts[0] not in methods:
        raise ValueError(f"experiments/distill.py: unknown arg {arg!r}; it starts with the method, one of {methods}")
    method, opts = parts[0], {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key not in ("steps", "iters", "runlocal") or (key != "runlocal") != bool(value):
            raise ValueError(f"experiments/distill.py: unknown arg option {p!r}; use steps=N, iters=N or runlocal")
        opts[key] = value
    runlocal = "runlocal" in opts
    c = demo.get_config("runlocal" if runlocal else None)
    c.name = f"{c.name}_distill_{method}"
    c.stages = ("distill",)
    d = c.distill
    d.method = method
    steps = int(opts.get("steps", 4))
    # trajectory: one step count, the teacher's 24-step Euler grid nests 1/2/4/8-step grids (K = 24 / steps);
    # shortcut / mean_flow: the jumps of the 1-, 2-, 4- and 8-step grids (shortcut: the 8-step ones from the teacher,
    # K = 3, the rest from the student's own finer jumps; mean_flow: + 25% instantaneous velocities).
    d.student_steps = (steps,) if method == "trajectory" else (steps, *(n for n in (1, 2, 4, 8) if n != steps))
    d.teacher_steps = 24
    d.batch_size = 16
    d.steps = int(opts.get("iters", 2000))
    d.optim.lr = 1e-4  # a fine-tune of the teacher's params
    d.optim.warmup_steps = 50
    d.optim.ema_decay = 0.995
    d.log_every = 20
    d.checkpoint_every = 500
    if runlocal:
        d.steps, d.batch_size, d.checkpoint_every, d.log_every, d.teacher_steps = 4, 8, 2, 1, 8
        d.student_steps = (2,) if method == "trajectory" else (2, 1)
    return c
