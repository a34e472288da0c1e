"""WanDiT <-> diffusers `WanTransformer3DModel`: the parameter map and the config translation.

Parameter paths already mirror diffusers (see models/dit.py), so the map is seven rules: Linear kernels are
transposed, norm `scale` becomes `weight`, the patch embedding is a Conv3d, and the stacked blocks
(leading "layers" axis) become `blocks.{i}.*`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from klingjax.export.param_map import Entry, Layout, Rule, expand, param_shapes
from klingjax.models.dit import AttentionLayout, DiTConfig, TextAttention, WanDiT

DIFFUSERS_CLASS = "WanTransformer3DModel"
DIFFUSERS_VERSION = "0.42.1"  # the version the export is tested against

DIT_RULES: tuple[Rule, ...] = (
    Rule(r"patch_embedding\.kernel", "patch_embedding.weight", Layout.CONV3D),
    Rule(r"blocks\.(.+)\.kernel", r"blocks.{layer}.\1.weight", Layout.LINEAR, stacked=True),
    Rule(r"blocks\.(.+)\.scale", r"blocks.{layer}.\1.weight", stacked=True),
    Rule(r"blocks\.(.+)", r"blocks.{layer}.\1", stacked=True),
    Rule(r"(.+)\.kernel", r"\1.weight", Layout.LINEAR),
    Rule(r"(.+)\.scale", r"\1.weight"),
    Rule(r"(.+)", r"\1"),
)


class UnsupportedConfigError(ValueError):
    """A model setting that the diffusers class cannot express."""


def abstract_dit(cfg: DiTConfig) -> WanDiT:
    """Shape-only model (no parameter memory, nothing compiled)."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def dit_entries(cfg: DiTConfig) -> list[Entry]:
    """One `Entry` per diffusers tensor of the DiT described by `cfg`."""
    return expand(DIT_RULES, param_shapes(abstract_dit(cfg)))


def dit_to_diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """The `config.json` of the equivalent `WanTransformer3DModel`; raises UnsupportedConfigError."""
    if not cfg.qk_norm:
        raise UnsupportedConfigError("WanTransformer3DModel always applies QK RMSNorm; qk_norm=False cannot export")
    if cfg.attention_layout is not AttentionLayout.JOINT_3D or cfg.text_attention is not TextAttention.CROSS:
        raise UnsupportedConfigError(
            "WanTransformer3DModel has only joint 3D self-attention + text cross-attention; this DiT uses "
            f"attention_layout={cfg.attention_layout.value}, text_attention={cfg.text_attention.value}")
    if cfg.rope_theta != 10000.0:
        raise UnsupportedConfigError(f"WanTransformer3DModel fixes RoPE theta at 10000, this DiT uses {cfg.rope_theta}")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def dit_from_diffusers_config(config: dict[str, Any], **overrides) -> DiTConfig:
    """A `DiTConfig` from a `WanTransformer3DModel` config.json dict (text-to-video layouts only)."""
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise UnsupportedConfigError(f"expected a {DIFFUSERS_CLASS} config, got {config.get('_class_name')!r}")
    extras = {k: config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if config.get(k)}
    if extras:
        raise UnsupportedConfigError(f"image-conditioned Wan transformers are not supported (config has {extras})")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise UnsupportedConfigError(f"qk_norm={config.get('qk_norm')!r} is not supported")
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    cfg = DiTConfig(
        dim=heads * head_dim,
        ffn_dim=config.get("ffn_dim", 13824),
        num_heads=heads,
        num_layers=config.get("num_layers", 40),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels", 16),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        eps=config.get("eps", 1e-6),
        cross_attn_norm=config.get("cross_attn_norm", True),
    )
    return dataclasses.replace(cfg, **overrides)
