"""LoRA recipe: teach a trained text-to-video model (the demo's, standing in for a released base) a colour it never saw.

    klingjax-train --config experiments/demo.py --workdir workdirs/demo                         # the base (~19 min)
    klingjax-train --config experiments/lora_recipe.py:workdirs/demo --workdir workdirs/lora_pink
    klingjax-eval --checkpoint workdirs/demo --dataset workdirs/lora_pink/data --concept pink \\
        --metrics adherence --limit 192 --out workdirs/lora_pink/base_eval                     # the base, same clips
    klingjax-lora merge --workdir workdirs/lora_pink --out workdirs/lora_pink_merged            # optional

The fine-tune writes a new synthetic dataset whose palette adds "pink" (the demo's six colours stay, so every batch
also replays old concepts), encodes it with the base's VAE and latent normalisation (`vae.from_workdir`: no VAE is
trained), and trains rank-16 LoRA factors on every block's attention and MLP projections while the base's params
stay frozen (stored in bfloat16, no optimizer state, not checkpointed: `dit/base.json` points at the base). The eval
reports adherence on the held-out clips showing pink (`adherence_<k>_with_pink`) and on the others
(`..._without_pink`); the second command scores the base on the same clips.

`heldout_fraction` 0.15 holds out 7 pink combos and keeps every combo the demo held out held out (the split is a
stable hash of each combo), so the old-concept comparison runs on combos neither model trained on... and on 16 the
base trained on. Arg: the base work dir, optionally followed by ",runlocal" (a tiny smoke version for tests).
"""

from __future__ import annotations

import os

import ml_collections

from experiments import demo

PINK = (250, 190, 210)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The fine-tune config; `arg` = "BASE_WORKDIR" or "BASE_WORKDIR,runlocal"."""
    base, _, flag = (arg or "").partition(",")
    if not base or flag not in ("", "runlocal"):
        raise ValueError("experiments/lora_recipe.py needs the base work dir: --config experiments/lora_recipe.py:"
                         f"workdirs/demo (optionally ',runlocal'); got {arg!r}")
    runlocal = flag == "runlocal"
    c = demo.get_config("runlocal" if runlocal else None)  # the base's data, VAE and DiT settings
    c.name = "lora_pink" + ("_runlocal" if runlocal else "")
    c.stages = ("data", "cache", "dit", "eval")
    c.data.extra_colours = {"pink": PINK}
    c.data.heldout_fraction = 0.15
    c.vae.from_workdir = os.path.abspath(base)

    c.dit.init_from = os.path.join(os.path.abspath(base), "dit")
    c.dit.init_from_ema = True
    c.dit.trainable.mode = "lora"
    c.dit.trainable.lora_rank = 16
    c.dit.trainable.lora_alpha = 16.0
    c.dit.trainable.frozen_dtype = "bfloat16"
    c.dit.steps = 1500
    c.dit.optim.lr = 1e-3
    c.dit.optim.warmup_steps = 50
    c.dit.checkpoint_every = 500

    c.data.num_eval = 192
    c.eval.num_clips = 192
    c.eval.concept = "pink"
    if runlocal:
        c.data.num_eval = c.eval.num_clips = 16
        c.dit.steps, c.dit.checkpoint_every = 4, 2
        c.dit.trainable.lora_rank = 2
    return c
