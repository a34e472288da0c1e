"""Causal 3D VAE recipe (Wan 2.1 layout: 4x8x8 compression, 16 latent channels) on real video clips.

Real data: ArrayRecord shards of klingjax video records (`klingjax.data.records.make_video_record`) under
DATA, named train-*.array_record / eval-*.array_record. On a TPU pod (every worker runs the same command):
    launch/tpu_pod.sh --tpu=$TPU_NAME --zone=$ZONE -- klingjax-train --config experiments/vae_recipe.py \
        --workdir gs://$BUCKET/vae --config.data.path=gs://$BUCKET/clips
On a SLURM GPU cluster:
    sbatch launch/slurm_gpu.sbatch klingjax-train --config experiments/vae_recipe.py --workdir /shared/vae \
        --config.data.path=/shared/clips
Variants: `demo` (the demo-size VAE on the built-in synthetic clips); `runlocal` (tiny, CPU, about a minute):
    klingjax-train --config experiments/vae_recipe.py:runlocal --workdir /tmp/vae_tiny
The trained VAE (WORKDIR/vae) is what experiments/t2v_recipe.py loads.
"""

from __future__ import annotations

import ml_collections

from klingjax.config import ExperimentConfig, config_from_dataclass

# Real-data VAE settings shared with t2v_recipe.py (its DiT stages load this VAE, so the shapes must match).
VAE_VARIANT = "wan2.1"
VAE_STEPS = 200_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """VAE-only experiment; `arg` is '' (real data), 'demo' or 'runlocal'."""
    if arg not in (None, "", "demo", "runlocal"):
        raise ValueError(f"experiments/vae_recipe.py: unknown arg {arg!r}; use '', 'demo' or 'runlocal'")
    c = config_from_dataclass(ExperimentConfig())
    c.name = "vae_recipe"
    c.stages = ("vae",)  # real data is converted offline; data.path points at it
    c.mesh.data, c.mesh.fsdp = -1, 1  # 127M params: plain data parallel

    c.data.num_frames, c.data.height, c.data.width = 17, 256, 256
    c.data.worker_count = 8
    c.vae.variant = VAE_VARIANT
    c.vae.batch_size = 64
    c.vae.num_frames = 17  # causal in time: 17-frame crops train it for any length
    c.vae.steps = VAE_STEPS
    c.vae.optim.lr = 1e-4
    c.vae.optim.warmup_steps = 1000
    c.vae.optim.weight_decay = 0.0
    c.vae.optim.ema_decay = 0.999
    c.vae.loss.kl_weight = 1e-6
    c.vae.sharding = "dp"
    c.vae.log_every, c.vae.checkpoint_every, c.vae.sample_every = 100, 2000, 5000

    if arg in ("demo", "runlocal"):
        c.name = f"vae_recipe_{arg}"
        c.stages = ("data", "vae")  # the built-in synthetic clips
        c.data.worker_count = 0
        c.data.num_frames, c.data.height, c.data.width = 9, 32, 32
        c.data.num_train, c.data.num_eval = 1024, 48
        c.vae.variant, c.vae.num_frames, c.vae.sharding = "demo", 0, "fsdp"
        c.vae.batch_size, c.vae.steps, c.vae.optim.lr, c.vae.optim.warmup_steps = 8, 400, 4e-4, 30
        c.vae.optim.ema_decay = 0.99
        c.vae.loss.mse_weight = 2.0  # as experiments/demo.py: L1 alone is slow to learn the small sprites
        c.vae.log_every, c.vae.checkpoint_every, c.vae.sample_every = 20, 200, 0
    if arg == "runlocal":
        c.data.num_train, c.data.num_eval = 64, 16
        c.vae.model_overrides = {"base_dim": 8}
        c.vae.steps, c.vae.checkpoint_every, c.vae.log_every = 6, 3, 1
        c.sample.num_samples = 2
    return c
