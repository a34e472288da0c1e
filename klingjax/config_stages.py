"""The train-stage sections of the experiment config (klingjax/config.py re-exports them): what every stage has
(`StageConfig`: batch, steps, optimiser, cadence, initialisation, what is trained) and each stage's own keys."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from klingjax.diffusion.distill import DistillMethod
from klingjax.diffusion.losses import LossWeighting
from klingjax.diffusion.schedules import TimestepSampling
from klingjax.models.layers.lora import DEFAULT_TARGETS as LORA_TARGETS
from klingjax.models.lpips import LPIPSNet


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping and EMA."""

    lr: float = 1e-3
    warmup_steps: int = 100
    decay: bool = True
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999


class TrainableMode(enum.Enum):
    """Which parameters a stage trains."""

    FULL = "full"  # every parameter
    SUBSET = "subset"  # the params whose path matches `trainable.params`; the rest frozen
    LORA = "lora"  # LoRA factors on the linear layers matching `trainable.lora_targets` (+ `trainable.params`)


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """What a stage trains (klingjax.train.trainable). Anything but `full` fine-tunes the model `init_from` names:
    frozen params come from it, get no optimizer state and no EMA copy, and are not checkpointed (the stage keeps
    a pointer to the base and its fingerprint in `base.json`).

    Patterns are regular expressions searched in "/"-joined param paths, e.g. `blocks/attn1/` (every self-attention
    param), `condition_embedder/` or `scale_shift_table$`.
    """

    mode: TrainableMode = TrainableMode.FULL
    params: tuple[str, ...] = ()  # subset: the params trained; lora: params trained in full beside the factors
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0: alpha = rank (scale 1)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers given factors (paths as in lora.DEFAULT_TARGETS)
    frozen_dtype: str = "float32"  # storage dtype of the frozen params: float32 | bfloat16


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """The train settings every stage has: model variant, batch, steps, optimiser, cadence, initialisation."""

    variant: str = ""
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # fields of the model's config
    batch_size: int = 16  # global
    num_frames: int = 0  # training clip length (centre crop, 1 + 4k); 0: data.num_frames
    steps: int = 1000
    max_steps_per_run: int = 0  # > 0: stop (after checkpointing) once this many steps ran in this process
    optim: OptimConfig = OptimConfig()
    sharding: str = "fsdp"  # rule preset name
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: only at the end
    init_from: str = ""  # fresh start only: load model params (model + EMA) from this stage/checkpoint dir
    init_from_ema: bool = True  # take the EMA params of `init_from` (else the raw model params)
    trainable: TrainableConfig = TrainableConfig()  # full training (default), a frozen subset, or LoRA
    # Step guard (klingjax.train.guard): a step with a non-finite loss / gradient norm (or a loss spike) is skipped;
    # more than this many consecutive skips stop the run (0: stop at the first).
    max_nonfinite_steps: int = 0
    loss_spike_factor: float = 0.0  # > 1: also skip a step whose loss > factor x the running median; 0: off
    loss_spike_window: int = 32  # accepted losses in that running median (a ring buffer in the checkpoint)


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Weights of the VAE objective: L1 + mse_weight * MSE + lpips_weight * LPIPS + kl_weight * KL."""

    kl_weight: float = 1e-6
    mse_weight: float = 0.0  # L1 alone is slow to learn small objects
    lpips_weight: float = 0.0  # per-frame LPIPS(recon, video); 0: off
    lpips_net: LPIPSNet = LPIPSNet.ALEX  # alex: ~20x cheaper than vgg
    lpips_frames: int = 0  # LPIPS on this many random frames of each clip per step; 0: all frames


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """The VAE stage's 3D PatchGAN: hinge loss with the adaptive weight x `weight` (0: no GAN)."""

    weight: float = 0.0
    start: int = 0  # optimizer step from which the discriminator trains and its loss applies
    lr: float = 0.0  # 0: the stage's optim.lr
    dim: int = 32  # channels (x1, x2, x4, x8 over its layers)
    layers: int = 3  # strided layers (each halves T, H, W)


@dataclasses.dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    """Stage "vae": train settings + the reconstruction loss + the discriminator."""

    variant: str = "demo"  # a key of klingjax.models.vae.VAE_VARIANTS
    # A klingjax-train work dir whose trained VAE (and latent normalisation) this experiment uses instead of training
    # one, e.g. to fine-tune a DiT trained there (the "vae" stage must then not run; variant/overrides must match).
    from_workdir: str = ""
    loss: VAELossConfig = VAELossConfig()
    disc: DiscConfig = DiscConfig()


@dataclasses.dataclass(frozen=True)
class DiTStageConfig(StageConfig):
    """Stage "dit": train settings + the rectified-flow objective on cached latents."""

    variant: str = "XS"  # a key of klingjax.models.dit.DIT_VARIANTS
    caption_dropout: float = 0.1
    timestep_sampling: TimestepSampling = TimestepSampling.LOGIT_NORMAL
    timestep_shift: float = 0.0  # 0: resolution-dependent shift
    loss_weighting: LossWeighting = LossWeighting.NONE
    # The masked-video task mixture: task name (klingjax.data.tasks.TASKS) -> weight, drawn per example.
    # Empty: text-to-video only. Any other task needs model_overrides.conditions.masked_video on.
    tasks: Mapping[str, float] = dataclasses.field(default_factory=dict)
    visual_dropout: float = 0.1  # P(an example's given positions are dropped: it trains as text-to-video)
    # Noise augmentation of the given latents (anti-drift for long rollouts, SkyReels-V2 / CausVid style): each example
    # re-noises its given positions to a level s ~ U(0, context_noise) and tells the model (Conditions.given_time);
    # generation may then re-noise its context (klingjax-generate --context_noise). 0: clean given latents.
    context_noise: float = 0.0


@dataclasses.dataclass(frozen=True)
class DistillStageConfig(StageConfig):
    """Stage "distill": a few-step student from a trained DiT (klingjax/train/distill.py), guidance folded in.

    The teacher is the EMA model of `init_from` (empty: this work dir's "dit" stage); the student starts from the
    same params, has the teacher's architecture (plus a zero-initialised jump-length embedding for mean_flow) and
    samples with guidance 1: one model evaluation per step. `variant` / `model_overrides` are not read.
    """

    method: DistillMethod = DistillMethod.TRAJECTORY
    # trajectory: the one step count the student is trained for (its grid: sampling_timesteps(n, shift));
    # shortcut (doubling counts, e.g. 4, 1, 2, 8) / mean_flow: the step counts whose grid jumps are trained (the
    # student samples any count). The first listed is the count a student samples with by default.
    student_steps: tuple[int, ...] = (4,)
    # trajectory / shortcut: teacher Euler steps over the whole grid (a multiple of the finest student count)
    teacher_steps: int = 24
    cfg_scale: float = 0.0  # folded text guidance; 0: sample.cfg_scale
    visual_cfg_scale: float = 0.0  # folded visual (masked-video) guidance; 0: sample.visual_cfg_scale
    instant_fraction: float = 0.25  # mean_flow: share of draws with r = t (the teacher's velocity itself)
    adaptive_weight: float = 0.0  # MeanFlow's adaptive loss weight 1 / (loss + 1e-3)^p: p (0: plain MSE)
