"""WanDiT <-> diffusers `WanTransformer3DModel`: the parameter map, the config translation, the masked-video layouts.

Parameter paths already mirror diffusers (see models/dit.py), so the map is seven rules: Linear kernels are
transposed, norm `scale` becomes `weight`, the patch embedding is a Conv3d, and the stacked blocks
(leading "layers" axis) become `blocks.{i}.*`.

Masked-video models (conditions.MaskedVideo) export to diffusers' `WanImageToVideoPipeline` (`PIPELINES`):
  * PER_TOKEN_TIMESTEPS: the same plain transformer (no extra parameters) in a pipeline with
    `expand_timesteps=True` (Wan 2.2 TI2V): the image alone, VAE-encoded, is the clean first latent frame and its
    tokens get timestep 0, which is exactly what klingjax does with a first-frame given mask.
  * CHANNEL_CONCAT: a Wan I2V-format transformer, in_channels = C + 4 + C = [noisy latents (C), mask (4: one per
    pixel frame of the latent frame's temporal group), condition latents (C)], the order `pipeline_wan_i2v.py`
    concatenates. Our patch embedding reads [latents (C)] through `kernel` and [given * mask (C), mask (1)] through
    `cond_kernel`; `fuse_patch_kernel` puts our mask row into the LAST of the 4 mask rows (the other 3 are zero)
    and `split_patch_kernel` sums the 4 rows back. Both are exact whenever the 4 mask channels are equal (I2V:
    all 1 at latent frame 0, all 0 elsewhere), the round trip is bit-exact (w + 0 + 0 + 0), and for first-last-frame
    (the last latent frame's mask is [0, 0, 0, 1]: only its last pixel frame is given) our model still reads mask 1,
    its own "this latent frame is given". Dividing the row by 4 over all 4 channels would be exact in the same
    cases but reads 1/4 there and does not round-trip bit-exactly.
    Semantic difference (transformer parity only): Wan's pipeline feeds the VAE encoding of [image, zeros...] as
    condition latents at every frame (non-zero where nothing is given, and not multiplied by the mask) and denoises
    the first latent frame like the others, whereas klingjax feeds given * mask (0 where nothing is given) and keeps
    given latents clean. The same inputs give the same outputs (`verify.diffusers_inputs` builds them the klingjax
    way); the pipeline's samples differ from klingjax's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.export.param_map import Entry, Layout, Rule, expand, param_shapes
from klingjax.models.conditions import ConditionSpec, MaskedVideo
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


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The diffusers pipeline a masked-video mode exports to (model_index.json's class and switches)."""

    class_name: str
    expand_timesteps: bool  # Wan 2.2 TI2V: per-token timesteps, the image as the clean first latent frame
    image_components: bool  # model_index names image_encoder / image_processor (None: Wan 2.2 style, no CLIP)


PIPELINES: dict[MaskedVideo, Pipeline] = {
    MaskedVideo.OFF: Pipeline("WanPipeline", expand_timesteps=False, image_components=False),
    MaskedVideo.PER_TOKEN_TIMESTEPS: Pipeline("WanImageToVideoPipeline", expand_timesteps=True, image_components=True),
    MaskedVideo.CHANNEL_CONCAT: Pipeline("WanImageToVideoPipeline", expand_timesteps=False, image_components=True),
}
MASK_CHANNELS = 4  # Wan I2V: one mask channel per pixel frame of a latent frame (the VAE's temporal factor)
PATCH_KERNEL = ("patch_embedding", "kernel")
COND_KERNEL = ("patch_embedding", "cond_kernel")


class UnsupportedConfigError(ValueError):
    """A model setting that the diffusers class cannot express."""


def abstract_dit(cfg: DiTConfig) -> WanDiT:
    """Shape-only model (no parameter memory, nothing compiled)."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def diffusers_layout(cfg: DiTConfig) -> DiTConfig:
    """The DiTConfig whose parameters have exactly diffusers' names and shapes (a plain T2V DiT).

    CHANNEL_CONCAT: one patch kernel over diffusers' C + 4 + C input channels, no `cond_kernel`; other modes have
    no extra parameters.
    """
    if cfg.conditions.masked_video is MaskedVideo.CHANNEL_CONCAT:
        return dataclasses.replace(cfg, in_channels=2 * cfg.in_channels + MASK_CHANNELS, conditions=ConditionSpec())
    return dataclasses.replace(cfg, conditions=ConditionSpec())


def dit_entries(cfg: DiTConfig) -> list[Entry]:
    """One `Entry` per diffusers tensor of the DiT described by `cfg` (paths of `diffusers_layout(cfg)`'s model)."""
    return expand(DIT_RULES, param_shapes(abstract_dit(diffusers_layout(cfg))))


# ---------------------------------------------------------------------------------------------------------
# CHANNEL_CONCAT patch kernel
# ---------------------------------------------------------------------------------------------------------


def patch_rows(c: int) -> np.ndarray:
    """For each of diffusers' 2C + 4 input channels, its row in our [kernel (C); cond_kernel (C + 1); zero row].

    diffusers [latents 0..C-1 | mask x4 | condition latents] <- ours [0..C-1 | zero, zero, zero, 2C | C..2C-1],
    where our rows are latents (0..C-1), given * mask (C..2C-1), mask (2C) and the zero row (2C + 1).
    """
    zero = 2 * c + 1
    return np.array([*range(c), *[zero] * (MASK_CHANNELS - 1), 2 * c, *range(c, 2 * c)])


def fuse_patch_kernel(kernel: np.ndarray, cond_kernel: np.ndarray) -> np.ndarray:
    """kernel (pt, ph, pw, C, D) + cond_kernel (pt, ph, pw, C + 1, D) -> diffusers' (pt, ph, pw, 2C + 4, D)."""
    c = kernel.shape[3]
    if cond_kernel.shape[3] != c + 1:
        raise ValueError(f"cond_kernel must read C + 1 = {c + 1} channels, got shape {cond_kernel.shape}")
    ours = np.concatenate([kernel, cond_kernel, np.zeros_like(kernel[..., :1, :])], axis=3)  # (.., 2C + 2, D)
    return ours[..., patch_rows(c), :]  # (pt, ph, pw, 2C + 4, D)


def split_patch_kernel(fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diffusers' (pt, ph, pw, 2C + 4, D) -> kernel (.., C, D), cond_kernel (.., C + 1, D); the 4 mask rows summed."""
    c = (fused.shape[3] - MASK_CHANNELS) // 2
    mask = fused[..., c:c + MASK_CHANNELS, :].sum(axis=3, keepdims=True, dtype=fused.dtype)  # (.., 1, D)
    return fused[..., :c, :], np.concatenate([fused[..., c + MASK_CHANNELS:, :], mask], axis=3)


def to_diffusers_params(cfg: DiTConfig, params: dict[tuple[str, ...], np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """Flat klingjax params (path -> array) -> the params of `diffusers_layout(cfg)`'s model (same paths)."""
    params = dict(params)
    if cfg.conditions.masked_video is MaskedVideo.CHANNEL_CONCAT:
        params[PATCH_KERNEL] = fuse_patch_kernel(params[PATCH_KERNEL], params.pop(COND_KERNEL))
    return params


def from_diffusers_params(cfg: DiTConfig,
                          params: dict[tuple[str, ...], np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """Inverse of `to_diffusers_params`: params of `diffusers_layout(cfg)`'s model -> the klingjax DiT's."""
    params = dict(params)
    if cfg.conditions.masked_video is MaskedVideo.CHANNEL_CONCAT:
        params[PATCH_KERNEL], params[COND_KERNEL] = split_patch_kernel(params[PATCH_KERNEL])
    return params


def flat_params(model: nnx.Module) -> dict[tuple[str, ...], np.ndarray]:
    """Path -> numpy value of every parameter of a (concrete) model."""
    state = nnx.state(model, nnx.Param)
    return {tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def from_diffusers_layout(layout_model: WanDiT, cfg: DiTConfig) -> WanDiT:
    """A `WanDiT(cfg)` holding the params of a loaded `diffusers_layout(cfg)` model (CHANNEL_CONCAT: split kernel)."""
    params = from_diffusers_params(cfg, flat_params(layout_model))
    graphdef, state = nnx.split(abstract_dit(cfg))
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params[tuple(str(p) for p in path)], var.dtype))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


def check_pipeline(cfg: DiTConfig) -> Pipeline:
    """The pipeline `cfg` exports to; raises UnsupportedConfigError where that pipeline cannot run the model."""
    pipeline = PIPELINES[cfg.conditions.masked_video]
    if pipeline.expand_timesteps and tuple(cfg.patch_size) != (1, 2, 2):
        # pipeline_wan_i2v.py builds the per-token timesteps as first_frame_mask[:, ::2, ::2]: one per (1, 2, 2) patch
        raise UnsupportedConfigError(f"{pipeline.class_name}(expand_timesteps=True) gives one timestep per (1, 2, 2) "
                                     f"patch; this DiT's patch_size is {tuple(cfg.patch_size)}")
    return pipeline


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
    if cfg.conditions.camera.value != "off":
        raise UnsupportedConfigError("WanTransformer3DModel has no camera adapter; this DiT reads Conditions.camera "
                                     f"(conditions.camera={cfg.conditions.camera.value}): sample it with klingjax")
    if cfg.conditions.flow_map:
        raise UnsupportedConfigError("WanTransformer3DModel has no jump-length embedding; this DiT is a flow-map "
                                     "(mean_flow) student (conditions.flow_map=True): sample it with klingjax, or "
                                     "export a trajectory student (distill.method=trajectory), a plain Wan DiT")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": diffusers_layout(cfg).in_channels,  # CHANNEL_CONCAT: C + 4 + C (Wan I2V)
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


def masked_video_from_diffusers(config: dict[str, Any], model_index: dict[str, Any] | None = None) -> MaskedVideo:
    """The masked-video mode of a diffusers Wan transformer config (+ its folder's model_index.json, if any).

    in_channels = out_channels: text-to-video, or PER_TOKEN_TIMESTEPS when model_index has expand_timesteps=true
    (Wan 2.2 TI2V); in_channels = 2 * out_channels + 4: CHANNEL_CONCAT (Wan I2V). Raises UnsupportedConfigError
    naming the config key otherwise.
    """
    index = model_index or {}
    known = {p.class_name for p in PIPELINES.values()}
    if index and index.get("_class_name") not in known:
        raise UnsupportedConfigError(f"model_index.json '_class_name' is {index.get('_class_name')!r}; only "
                                     f"{sorted(known)} folders can be imported")
    if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None:
        raise UnsupportedConfigError("model_index.json 'boundary_ratio' / 'transformer_2': two-stage (Wan 2.2 A14B) "
                                     "pipelines have two transformers; klingjax imports one DiT")
    c_in, c_out = config.get("in_channels", 16), config.get("out_channels", 16)
    expand_timesteps = bool(index.get("expand_timesteps", False))
    if c_in == 2 * c_out + MASK_CHANNELS:
        if expand_timesteps:
            raise UnsupportedConfigError(f"transformer 'in_channels'={c_in} (Wan I2V channel concat) with model_index "
                                         "'expand_timesteps'=true: no klingjax layout reads both")
        return MaskedVideo.CHANNEL_CONCAT
    if c_in != c_out:
        raise UnsupportedConfigError(
            f"transformer 'in_channels'={c_in} with 'out_channels'={c_out}: klingjax imports in_channels = "
            f"out_channels (text-to-video, or Wan 2.2 TI2V with expand_timesteps) or 2 * out_channels + "
            f"{MASK_CHANNELS} (Wan I2V channel concat)")
    return MaskedVideo.PER_TOKEN_TIMESTEPS if expand_timesteps else MaskedVideo.OFF


def dit_from_diffusers_config(config: dict[str, Any], model_index: dict[str, Any] | None = None,
                              **overrides) -> DiTConfig:
    """A `DiTConfig` from a `WanTransformer3DModel` config.json dict (+ model_index.json for the masked-video mode)."""
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise UnsupportedConfigError(f"expected a {DIFFUSERS_CLASS} config, got {config.get('_class_name')!r}")
    extras = {k: config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if config.get(k)}
    if extras:
        raise UnsupportedConfigError(f"image-conditioned Wan transformers are not supported (config has {extras})")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise UnsupportedConfigError(f"qk_norm={config.get('qk_norm')!r} is not supported")
    masked_video = masked_video_from_diffusers(config, model_index)
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    cfg = DiTConfig(
        dim=heads * head_dim,
        ffn_dim=config.get("ffn_dim", 13824),
        num_heads=heads,
        num_layers=config.get("num_layers", 40),
        patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        in_channels=config.get("out_channels", 16),  # the latents' C; CHANNEL_CONCAT's extra channels are conditions
        out_channels=config.get("out_channels", 16),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        eps=config.get("eps", 1e-6),
        cross_attn_norm=config.get("cross_attn_norm", True),
        conditions=ConditionSpec(masked_video=masked_video),
    )
    return dataclasses.replace(cfg, **overrides)
