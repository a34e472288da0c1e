"""The multi-task Kling experiment: one DiT trained on the masked-video task mixture (issue 15).

Text-to-video, image-to-video, first+last frame, keyframes, extension forwards and backwards, inpainting and
outpainting are all one mechanism, a pattern of given latent positions (klingjax/data/tasks.py), drawn per
example with the weights of `dit.tasks`. The demo's data, VAE and DiT size; the DiT trains longer, as it learns
eight tasks instead of one. Later capabilities (camera, shots, references, audio) join this experiment.

Launch (about 40 minutes on 2 CPU cores), then the per-task report card is in the work dir's report.md:
    klingjax-train --config experiments/kling.py --workdir workdirs/kling
The other way for the given latents to enter the DiT (compare them with experiments/kling_modes_sweep.py):
    klingjax-train --config experiments/kling.py:channel_concat --workdir workdirs/kling_cc
A tiny smoke version (about two minutes):
    klingjax-train --config experiments/kling.py:runlocal --workdir /tmp/kling_tiny
Generate from the result:
    klingjax-generate --checkpoint workdirs/kling --image first.png --prompt "a red circle moving left" --out x.mp4
"""

from __future__ import annotations

import ml_collections

from experiments import demo

# Task -> weight (klingjax.data.tasks.TASKS). Image-to-video is what users ask for most (Kling's I2V share), so it
# weighs double; text-to-video stays in the mix so the model keeps generating from text alone.
TASK_WEIGHTS = {"t2v": 1.0, "i2v": 2.0, "flf2v": 1.0, "keyframes": 0.5, "prefix": 1.0, "suffix": 0.5,
                "inpaint": 1.0, "outpaint": 0.5}
MODES = ("per_token_timesteps", "channel_concat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: '' (per-token timesteps), a mode of `MODES`, 'runlocal' or '<mode>,runlocal'."""
    parts = [p for p in (arg or "").split(",") if p]
    runlocal = "runlocal" in parts
    modes = [p for p in parts if p != "runlocal"]
    if len(modes) > 1 or any(m not in MODES for m in modes):
        raise ValueError(f"experiments/kling.py: unknown arg {arg!r}; use '', 'runlocal', a mode of {MODES} or "
                         "'<mode>,runlocal'")
    mode = modes[0] if modes else MODES[0]
    c = demo.get_config("runlocal" if runlocal else None)
    c.name = "kling" + ("" if mode == MODES[0] else "_" + mode) + ("_runlocal" if runlocal else "")
    c.dit.tasks = dict(TASK_WEIGHTS)
    c.dit.visual_dropout = 0.1
    overrides = dict(c.dit.model_overrides)
    overrides["conditions"] = {"masked_video": mode}
    c.dit.model_overrides = overrides
    if runlocal:
        c.eval.num_clips = 8  # one batch per task in the task card
    else:
        c.dit.steps = 4000
        c.dit.checkpoint_every = 1000
    return c
