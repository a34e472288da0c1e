"""Camera control (issue 17): text-to-video on clips seen through a moving camera (pan, zoom, roll, and pairs of
them), with the camera as a condition or as caption words only; the demo's recipe otherwise (VAE, then DiT).

    klingjax-train --config experiments/camera.py:all_blocks --workdir workdirs/camera_adapter     # trains the VAE too
    klingjax-train --config experiments/camera.py:text,vae=workdirs/camera_adapter --workdir workdirs/camera_text
    klingjax-train --config experiments/camera.py:first_blocks,vae=workdirs/camera_adapter \\
        --workdir workdirs/camera_first
    python experiments/camera_report.py --out workdirs/camera_report.md all_blocks=workdirs/camera_adapter \\
        first_blocks=workdirs/camera_first text=workdirs/camera_text

Modes: `all_blocks` / `first_blocks` - `Conditions.camera` (the clip's per-frame camera path) through the
zero-initialised camera adapter of every block / of the first two (`ConditionSpec.camera`), captions without camera
words; `text` - no adapter, the captions name the moves ("..., the camera pans left and the camera zooms in"). Every
mode draws the same clips (same seed; only the captions differ) and trains the DiT from scratch for the same steps and
batch; `vae=WORKDIR` reuses that work dir's VAE and latent normalisation instead of training one (`vae.from_workdir`).
Camera clips carry a stronger, smoother background texture than the demo's (SyntheticSpec.camera_texture_*): the
demo's +-7.5 grey levels at 5-11 px are below what its VAE reconstructs, so no camera would be visible through it;
and one fixed texture per background colour (`data.camera_world_texture`): with a random texture per clip the XS DiT
generated flat backgrounds (nothing to see a camera move by).
The eval scores the held-out clips' camera with `klingjax/eval/camera_metrics.py` (`camera_*`,
`object_direction_acc_*`; `_on_real` = the estimator on the ground truth, `_on_vae` = on the VAE's reconstructions,
any DiT's floor), and adherence as always. Arg: "MODE[,vae=WORKDIR][,runlocal]".
"""

from __future__ import annotations

import os

import ml_collections

from experiments import demo

MODES = ("all_blocks", "first_blocks", "text")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    mode = parts[0] if parts else ""
    options = parts[1:]
    runlocal = "runlocal" in options
    vae = [o.removeprefix("vae=") for o in options if o.startswith("vae=")]
    if mode not in MODES or len(options) != runlocal + len(vae) or len(vae) > 1:
        raise ValueError(f"experiments/camera.py: arg 'MODE[,vae=WORKDIR][,runlocal]' with MODE in {MODES}; "
                         f"got {arg!r}")
    c = demo.get_config("runlocal" if runlocal else None)
    c.name = f"camera_{mode}" + ("_runlocal" if runlocal else "")
    if vae:
        c.stages = ("data", "cache", "dit", "eval")
        c.vae.from_workdir = os.path.abspath(vae[0])
    c.data.num_train = 2048
    c.data.num_eval = 96
    c.data.p_camera_move = 0.8
    c.data.p_two_moves = 0.25
    c.data.camera_words = mode == "text"
    c.data.camera_world_texture = True
    if mode != "text":
        c.dit.model_overrides = {**c.dit.model_overrides, "conditions": {"camera": mode, "camera_blocks": 2}}
    c.eval.num_clips = 96
    if runlocal:
        c.data.num_train, c.data.num_eval, c.eval.num_clips = 64, 16, 16
    return c
