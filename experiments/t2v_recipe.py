"""Real-data text-to-video recipe: images first, then short low-resolution video, then 480p video.

A staged curriculum. Each stage is a variant with its own work directory; a stage continues the previous
one because its `dit/` checkpoints are copied in and `dit.steps` counts from the start of stage 1 (the train
loop resumes from the latest checkpoint, so the step count, EMA and optimiser state carry over; the DiT is
resolution- and length-agnostic: 3D RoPE, patchify). Latents are cached per stage, at that stage's size.
The VAE comes from experiments/vae_recipe.py (same VAE settings, trained once, copied in).

Data: ArrayRecord shards of klingjax video records at DATA (train-*/eval-*). With W=gs://$BUCKET/t2v:
    klingjax-train --config experiments/vae_recipe.py --workdir $W/vae --config.data.path=$DATA
    gsutil -m cp -r $W/vae/vae $W/stage1/vae
    launch/tpu_pod.sh --tpu=$TPU_NAME --zone=$ZONE -- klingjax-train --config experiments/t2v_recipe.py:stage1 \
        --workdir $W/stage1 --config.data.path=$DATA
    gsutil -m cp -r $W/stage1/vae $W/stage1/dit $W/stage2/
    launch/tpu_pod.sh --tpu=$TPU_NAME --zone=$ZONE -- klingjax-train --config experiments/t2v_recipe.py:stage2 \
        --workdir $W/stage2 --config.data.path=$DATA
    (stage3 likewise, from stage2). On SLURM: sbatch launch/slurm_gpu.sbatch klingjax-train ... (same flags).
Tiny CPU version of a stage (synthetic data, trains its own tiny VAE; about a minute):
    klingjax-train --config experiments/t2v_recipe.py:stage2,runlocal --workdir /tmp/t2v_tiny

Image+video: stage 1 trains on single frames (an image is a 1-frame video; the causal VAE encodes frame 0
alone) at a large batch, stages 2-3 on clips. Mixing images and clips inside one batch needs a data-mixture
field the config does not have yet.
"""

from __future__ import annotations

import ml_collections

from experiments import vae_recipe
from klingjax.config import ExperimentConfig, config_from_dataclass

# The curriculum: frames x height x width, global batch, cumulative DiT steps, lr. Variants are rows.
CURRICULUM = {
    "stage1": dict(frames=1, height=256, width=256, batch=1024, steps=100_000, lr=1e-4),  # images
    "stage2": dict(frames=17, height=256, width=256, batch=256, steps=160_000, lr=1e-4),  # short 256px clips
    "stage3": dict(frames=33, height=480, width=832, batch=64, steps=200_000, lr=5e-5),  # 480p clips
}
RUNLOCAL = {  # the same curriculum, shrunk for CPU
    "stage1": dict(frames=1, height=32, width=32, batch=16, steps=6),
    "stage2": dict(frames=9, height=32, width=32, batch=8, steps=12),
    "stage3": dict(frames=9, height=48, width=48, batch=8, steps=18),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` = 'stage1' | 'stage2' | 'stage3' (default stage1), optionally ',runlocal'."""
    parts = [p for p in (arg or "stage1").split(",") if p]
    runlocal = "runlocal" in parts
    stage = next((p for p in parts if p != "runlocal"), "stage1")
    if stage not in CURRICULUM or len(parts) > 1 + runlocal:
        raise ValueError(f"experiments/t2v_recipe.py: unknown arg {arg!r}; use {sorted(CURRICULUM)}[,runlocal]")
    row = CURRICULUM[stage]
    vae = vae_recipe.get_config("runlocal" if runlocal else None).vae

    c = config_from_dataclass(ExperimentConfig())
    c.name = f"t2v_{stage}"
    c.stages = ("cache", "dit")  # the VAE is trained by vae_recipe.py and copied into the work dir
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.data.num_frames, c.data.height, c.data.width = row["frames"], row["height"], row["width"]
    c.data.worker_count = 8
    c.text_max_len = 64
    c.vae = vae
    c.vae.num_frames = 0  # the VAE's training crop; this recipe only loads the VAE

    c.dit.variant = "1.3B"
    c.dit.batch_size = row["batch"]
    c.dit.steps = row["steps"]
    c.dit.optim.lr = row["lr"]
    c.dit.optim.warmup_steps = 2000 if stage == "stage1" else 500
    c.dit.optim.decay = stage == "stage3"  # constant lr until the last stage, so resumed stages chain
    c.dit.optim.weight_decay = 0.01
    c.dit.optim.ema_decay = 0.9999
    c.dit.sharding = "fsdp"
    c.dit.timestep_sampling = "logit_normal"
    c.dit.timestep_shift = 0.0  # resolution/length-dependent: grows with the token count per stage
    c.dit.caption_dropout = 0.1
    c.dit.log_every, c.dit.checkpoint_every, c.dit.keep_checkpoints = 100, 2000, 3
    c.sample.sampler, c.sample.num_steps, c.sample.cfg_scale = "dpmpp_2m", 30, 5.0
    c.eval.fvd = row["frames"] >= 9

    if runlocal:
        small = RUNLOCAL[stage]
        c.name += "_runlocal"
        c.stages = ("data", "vae", "cache", "dit", "eval")  # synthetic clips; a tiny VAE of its own
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.data.num_frames, c.data.height, c.data.width = small["frames"], small["height"], small["width"]
        c.data.num_train, c.data.num_eval, c.data.worker_count = 64, 16, 0
        c.text_max_len = 16
        c.dit.variant = "XS"
        c.dit.model_overrides = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2}
        c.dit.batch_size, c.dit.steps = small["batch"], small["steps"]
        c.dit.optim.lr, c.dit.optim.warmup_steps, c.dit.optim.ema_decay = 1e-3, 2, 0.99
        c.dit.log_every, c.dit.checkpoint_every = 1, 3
        c.sample.sampler, c.sample.num_steps, c.sample.num_samples = "euler", 2, 2
        c.eval.num_clips, c.eval.batch_size, c.eval.fvd = 16, 8, False
    return c
