"""Stage definitions for the train loop: the VAE stage (videos) and the DiT stage (cached latents)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.config import ExperimentConfig, StageConfig
from klingjax.data.pipeline import decode_video_record, make_dataset
from klingjax.data.records import list_shards
from klingjax.diffusion import losses, schedules
from klingjax.models.discriminator import DiscriminatorConfig, PatchDiscriminator3D
from klingjax.models.dit import WanDiT, dit_config
from klingjax.models.vae import VAE_VARIANTS, CausalVAE, VAEConfig
from klingjax.train.loop import StageSpec
from klingjax.train.vae_losses import VAELossConfig, load_lpips, vae_loss
from klingjax.train.vae_losses import psnr as psnr  # re-exported: the VAE sampler reads it from here

# ---------------------------------------------------------------------------------------------------------
# Paths and model configs
# ---------------------------------------------------------------------------------------------------------


def data_dir(exp: ExperimentConfig, workdir: str) -> str:
    return exp.data.path or os.path.join(workdir, "data")


def latent_dir(workdir: str) -> str:
    return os.path.join(workdir, "latents")


def vae_config(exp: ExperimentConfig) -> VAEConfig:
    """The VAE variant named by `vae.variant` with `vae.model_overrides` applied."""
    if exp.vae.variant not in VAE_VARIANTS:
        raise ValueError(f"config key 'vae.variant': unknown {exp.vae.variant!r}; choose from {sorted(VAE_VARIANTS)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in exp.vae.model_overrides.items()}
    return dataclasses.replace(VAE_VARIANTS[exp.vae.variant], **overrides)


def dit_model_config(exp: ExperimentConfig, text_dim: int):
    """The DiT variant with channels tied to the VAE and the text width tied to the text encoder."""
    z = vae_config(exp).z_dim
    overrides = dict(exp.dit.model_overrides)
    return dit_config(exp.dit.variant, in_channels=z, out_channels=z, text_dim=text_dim, **overrides)


def latent_grid(exp: ExperimentConfig) -> tuple[int, int, int, int]:
    """(t, h, w, c) of one clip's latents."""
    vc = vae_config(exp)
    return (*vc.latent_shape(exp.data.num_frames, exp.data.height, exp.data.width), vc.z_dim)


def train_shift(exp: ExperimentConfig) -> float:
    """Timestep shift: the configured one, or the resolution/length-dependent default."""
    if exp.dit.timestep_shift > 0:
        return exp.dit.timestep_shift
    t, h, w, _ = latent_grid(exp)
    pt, ph, pw = dit_model_config(exp, 1).patch_size
    return schedules.resolution_shift((t // pt) * (h // ph) * (w // pw))


# ---------------------------------------------------------------------------------------------------------
# VAE stage
# ---------------------------------------------------------------------------------------------------------


def _video_only(record: dict, *, num_frames: int, height: int, width: int) -> dict:
    out = decode_video_record(record, num_frames=num_frames, height=height, width=width)
    return {"video": out["video"]}


def vae_loss_config(cfg: StageConfig) -> VAELossConfig:
    """The loss weights of the vae stage config."""
    return VAELossConfig(kl_weight=cfg.kl_weight, mse_weight=cfg.mse_weight, lpips_weight=cfg.lpips_weight,
                         lpips_net=cfg.lpips_net, lpips_frames=cfg.lpips_frames, disc_weight=cfg.disc_weight,
                         disc_start=cfg.disc_start)


def vae_stage(exp: ExperimentConfig, workdir: str, on_sample=None) -> StageSpec:
    """Stage "vae": L1 (+ MSE) + LPIPS + KL [+ 3D PatchGAN] training of the causal VAE on raw clips."""
    vcfg = vae_config(exp)
    cfg, d = exp.vae, exp.data
    loss_cfg = vae_loss_config(cfg)

    def make_model(rngs: nnx.Rngs) -> CausalVAE:
        return CausalVAE(vcfg, rngs=rngs)

    make_disc = None
    if cfg.disc_weight > 0:
        dcfg = DiscriminatorConfig(dim=cfg.disc_dim, num_layers=cfg.disc_layers, in_channels=vcfg.out_channels)
        make_disc = lambda rngs: PatchDiscriminator3D(dcfg, rngs=rngs)
    frozen = (lambda: {"lpips": load_lpips(cfg.lpips_net)}) if cfg.lpips_weight > 0 else None

    def dataset(per_host: int, seed: int, index: int, count: int):
        # A causal VAE is convolutional in time: short clips train it for any length, at a fraction of the cost.
        frames = cfg.num_frames or d.num_frames
        decode = functools.partial(_video_only, num_frames=frames, height=d.height, width=d.width)
        return make_dataset(list_shards(data_dir(exp, workdir), "train"), decode=decode, batch_size=per_host,
                            seed=seed, shuffle=True, num_epochs=None, process_index=index, process_count=count,
                            worker_count=d.worker_count)

    return StageSpec("vae", "vae", make_model, functools.partial(vae_loss, cfg=loss_cfg), dataset, ("video",),
                     on_sample, loss_context=True, make_disc=make_disc, frozen=frozen)


# ---------------------------------------------------------------------------------------------------------
# DiT stage
# ---------------------------------------------------------------------------------------------------------


def load_latent_stats(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the cached latents, written by the cache stage."""
    path = os.path.join(latent_dir(workdir), "latent_stats.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the 'cache' stage first")
    with open(path) as f:
        stats = json.load(f)
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


def _latent_example(record: dict, *, mean: np.ndarray, std: np.ndarray) -> dict:
    return {
        "latent": (np.asarray(record["latent"], np.float32) - mean) / std,  # (t, h, w, c), ~unit scale
        "text": np.asarray(record["text"], np.float32),  # (L, text_dim)
        "text_mask": np.asarray(record["text_mask"], bool),  # (L,)
    }


def dit_stage(exp: ExperimentConfig, workdir: str, null_text: tuple[np.ndarray, np.ndarray],
              on_sample=None) -> StageSpec:
    """Stage "dit": rectified-flow training on cached latents with caption dropout to the empty prompt.

    `null_text` is the text encoder's (hidden (L, D), mask (L,)) of the empty prompt.
    """
    cfg = exp.dit
    null_ctx, null_mask = (jnp.asarray(a) for a in null_text)
    mcfg = dit_model_config(exp, null_ctx.shape[-1])
    shift = train_shift(exp)

    def make_model(rngs: nnx.Rngs) -> WanDiT:
        return WanDiT(mcfg, rngs=rngs)

    def loss_fn(model: WanDiT, batch, key):
        x0, ctx, mask = batch["latent"], batch["text"], batch["text_mask"]
        k_t, k_n, k_d = jax.random.split(key, 3)
        b = x0.shape[0]
        drop = jax.random.uniform(k_d, (b,)) < cfg.caption_dropout  # (B,)
        ctx = jnp.where(drop[:, None, None], null_ctx[None], ctx)
        mask = jnp.where(drop[:, None], null_mask[None], mask)
        t = schedules.sample_timesteps(k_t, b, method=cfg.timestep_sampling, shift=shift)
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        velocity = lambda x_t, t: model(x_t, t * 1000.0, ctx, mask)
        loss, _ = losses.flow_matching_loss(velocity, x0, noise, t, weighting=cfg.loss_weighting)
        return loss, {"t_mean": jnp.mean(t)}

    def dataset(per_host: int, seed: int, index: int, count: int):
        mean, std = load_latent_stats(workdir)
        decode = functools.partial(_latent_example, mean=mean, std=std)
        return make_dataset(list_shards(latent_dir(workdir), "train"), decode=decode, batch_size=per_host,
                            seed=seed, shuffle=True, num_epochs=None, process_index=index, process_count=count,
                            worker_count=exp.data.worker_count)

    return StageSpec("dit", "dit", make_model, loss_fn, dataset, ("latent", "text", "text_mask"), on_sample)
