"""Camera control (issue 17): the demo's text-to-video model fine-tuned on clips seen through a moving camera (pan,
zoom, roll, and pairs of them), with the camera as a condition or as caption words only.

    klingjax-train --config experiments/demo.py --workdir workdirs/demo                       # the base (~19 min)
    klingjax-train --config experiments/camera.py:workdirs/demo,all_blocks --workdir workdirs/camera_adapter
    klingjax-train --config experiments/camera.py:workdirs/demo,first_blocks --workdir workdirs/camera_first
    klingjax-train --config experiments/camera.py:workdirs/demo,text --workdir workdirs/camera_text

Modes: `all_blocks` / `first_blocks` - `Conditions.camera` (the clip's per-frame camera path) through the
zero-initialised camera adapter of every block / of the first two (`ConditionSpec.camera`), captions without camera
words; `text` - no adapter, the captions name the moves ("..., the camera pans left and the camera zooms in"). All
modes start from the base's DiT (init_from, every param trained) and use its VAE and latent normalisation
(`vae.from_workdir`), with the same data draws, steps and batch. The eval scores the held-out clips' camera with
`klingjax/eval/camera_metrics.py` (`camera_*`, `object_direction_acc_*`), and adherence as always.
Arg: "BASE_WORKDIR,MODE" (optionally ",runlocal": a tiny smoke version for tests).
"""

from __future__ import annotations

import os

import ml_collections

from experiments import demo

MODES = ("all_blocks", "first_blocks", "text")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "").split(",")
    base, mode = parts[0], parts[1] if len(parts) > 1 else ""
    runlocal = parts[2:] == ["runlocal"]
    if not base or mode not in MODES or parts[2:] not in ([], ["runlocal"]):
        raise ValueError(f"experiments/camera.py: arg 'BASE_WORKDIR,MODE[,runlocal]' with MODE in {MODES}; got {arg!r}")
    c = demo.get_config("runlocal" if runlocal else None)
    c.name = f"camera_{mode}" + ("_runlocal" if runlocal else "")
    c.stages = ("data", "cache", "dit", "eval")
    c.vae.from_workdir = os.path.abspath(base)
    c.data.num_train = 2048
    c.data.num_eval = 96
    c.data.p_camera_move = 0.8
    c.data.p_two_moves = 0.25
    c.data.camera_words = mode == "text"
    if mode != "text":
        c.dit.model_overrides = {**c.dit.model_overrides, "conditions": {"camera": mode, "camera_blocks": 2}}
    c.dit.init_from = os.path.join(os.path.abspath(base), "dit")
    c.dit.steps = 2500
    c.dit.optim.lr = 5e-4
    c.dit.optim.warmup_steps = 50
    c.eval.num_clips = 96
    if runlocal:
        c.data.num_train, c.data.num_eval, c.eval.num_clips = 64, 16, 16
        c.dit.steps, c.dit.checkpoint_every = 4, 2
    return c
