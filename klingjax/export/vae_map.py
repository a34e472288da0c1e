"""CausalVAE <-> diffusers `AutoencoderKLWan`: the parameter map and the config translation.

The module tree already mirrors diffusers (see models/vae.py). What differs: kernels are channels-last
(Conv3d and Conv2d weights are permuted), the per-frame 2D convs of the resamplers sit at index 1 of a
torch `nn.Sequential` (`resample.1`), and Wan's RMS-norm `gamma` is (C, 1, 1, 1) for videos but (C, 1, 1)
inside the attention blocks (the only modules with a child called `norm`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from klingjax.export.dit_map import DIFFUSERS_VERSION, UnsupportedConfigError
from klingjax.export.param_map import Entry, Layout, Rule, expand, param_shapes
from klingjax.models.vae import CausalVAE, VAEConfig

DIFFUSERS_CLASS = "AutoencoderKLWan"

VAE_RULES: tuple[Rule, ...] = (
    Rule(r"(.+\.resample)\.kernel", r"\1.1.weight", Layout.CONV2D),
    Rule(r"(.+\.resample)\.bias", r"\1.1.bias"),
    Rule(r"(.+\.(?:to_qkv|proj))\.kernel", r"\1.weight", Layout.CONV2D),
    Rule(r"(.+\.norm)\.gamma", r"\1.gamma", Layout.GAMMA_2D),
    Rule(r"(.+)\.gamma", r"\1.gamma", Layout.GAMMA_3D),
    Rule(r"(.+)\.kernel", r"\1.weight", Layout.CONV3D),
    Rule(r"(.+)", r"\1"),
)


def abstract_vae(cfg: VAEConfig) -> CausalVAE:
    """Shape-only model (no parameter memory, nothing compiled)."""
    return nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0)))


def vae_entries(cfg: VAEConfig) -> list[Entry]:
    """One `Entry` per diffusers tensor of the VAE described by `cfg`."""
    return expand(VAE_RULES, param_shapes(abstract_vae(cfg)))


def vae_to_diffusers_config(cfg: VAEConfig, latents_mean: np.ndarray | None = None,
                            latents_std: np.ndarray | None = None) -> dict[str, Any]:
    """The `config.json` of the equivalent `AutoencoderKLWan`, with the DiT's latent normalisation stats."""
    if cfg.temporal_factor != 4:
        raise UnsupportedConfigError(
            f"AutoencoderKLWan encodes in chunks of 4 frames; this VAE compresses time by {cfg.temporal_factor}"
        )
    mean = np.zeros(cfg.z_dim) if latents_mean is None else np.asarray(latents_mean, np.float64)
    std = np.ones(cfg.z_dim) if latents_std is None else np.asarray(latents_std, np.float64)
    if mean.shape != (cfg.z_dim,) or std.shape != (cfg.z_dim,):
        raise ValueError(f"latent stats must have {cfg.z_dim} channels, got {mean.shape} and {std.shape}")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "base_dim": cfg.base_dim,
        "decoder_base_dim": None,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": list(cfg.attn_scales),
        "temperal_downsample": list(cfg.temporal_downsample),  # sic: diffusers' spelling
        "dropout": cfg.dropout,
        "latents_mean": [float(x) for x in mean],
        "latents_std": [float(x) for x in std],
        "is_residual": False,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "patch_size": None,
        "scale_factor_temporal": cfg.temporal_factor,
        "scale_factor_spatial": cfg.spatial_factor,
    }


def vae_from_diffusers_config(config: dict[str, Any]) -> tuple[VAEConfig, np.ndarray, np.ndarray]:
    """(VAEConfig, latents_mean, latents_std) from an `AutoencoderKLWan` config.json dict (Wan 2.1 layout)."""
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise UnsupportedConfigError(f"expected a {DIFFUSERS_CLASS} config, got {config.get('_class_name')!r}")
    base = config.get("base_dim", 96)
    if config.get("is_residual") or config.get("patch_size") or config.get("decoder_base_dim") not in (None, base):
        raise UnsupportedConfigError("only the Wan 2.1 VAE layout is supported (not Wan 2.2's residual/patched VAE)")
    cfg = VAEConfig(
        base_dim=base,
        z_dim=config.get("z_dim", 16),
        dim_mult=tuple(config.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=config.get("num_res_blocks", 2),
        attn_scales=tuple(float(s) for s in config.get("attn_scales", ())),
        temporal_downsample=tuple(bool(b) for b in config.get("temperal_downsample", (False, True, True))),
        dropout=config.get("dropout", 0.0),
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
    )
    mean = np.asarray(config.get("latents_mean", np.zeros(cfg.z_dim)), np.float32)
    std = np.asarray(config.get("latents_std", np.ones(cfg.z_dim)), np.float32)
    return cfg, mean, std
