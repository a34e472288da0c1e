"""Wan 2.1-compatible video DiT (diffusers `WanTransformer3DModel`) in Flax NNX.

latents (B, t, h, w, C_in) -> patch tokens (B, N, D) -> num_layers x [self-attn with 3D RoPE, cross-attn to
text, MLP, each modulated by one shared time MLP + per-block tables] -> final modulated norm -> velocity
(B, t, h, w, C_out). Parameter paths mirror diffusers so the export map is mechanical; blocks are stored
stacked on a leading "layers" axis (scan-friendly) and run with `nnx.scan` or a Python loop.
Neighbours: layers/ (attention, rope, norms, embeddings), diffusion/ (what the velocity means).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klingjax.models.layers.attention import AttentionImpl, WanAttention, dense, table_init
from klingjax.models.layers.embeddings import ConditionEmbedder, PatchEmbed, check_patchable, unpatchify
from klingjax.models.layers.norms import LayerNorm, logical
from klingjax.models.layers.rope import rope_3d
from klingjax.sharding.rules import shard

ACT_BND = ("act_batch", "act_length", "act_embed")


# ---------------------------------------------------------------------------------------------------------
# Config and variants
# ---------------------------------------------------------------------------------------------------------


class RematPolicy(enum.Enum):
    """What each block keeps for the backward pass."""

    NONE = "none"  # no rematerialisation
    FULL = "full"  # keep only the block input; recompute everything
    DOTS_SAVEABLE = "dots_saveable"  # keep matmul outputs without batch dims; recompute the rest


_CHECKPOINT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS_SAVEABLE: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Architecture and execution settings of `WanDiT` (dim = num_heads * head_dim)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    scan_layers: bool = True
    remat: RematPolicy = RematPolicy.NONE
    attention_impl: AttentionImpl = AttentionImpl.DEFAULT
    dtype: Any = jnp.float32  # compute dtype of matmuls; norms, modulation and time MLP stay float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or len(self.patch_size) != 3:
            raise ValueError(f"need an even head_dim (got {self.head_dim}) and a 3D patch (got {self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_VARIANTS: dict[str, DiTConfig] = {
    # CPU demos; text_dim matches the MiniLM text encoder (384).
    "XS": DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=384),
    "S": DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=384),
    # Wan 2.1 published sizes (umT5-XXL text, 4096-d).
    "1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "14B": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
}


def dit_config(variant: str, **overrides) -> DiTConfig:
    """A variant from `DIT_VARIANTS` with fields replaced by `overrides`."""
    if variant not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {sorted(DIT_VARIANTS)}")
    return dataclasses.replace(DIT_VARIANTS[variant], **overrides)


# ---------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------


class GELUProj(nnx.Module):
    """Linear then tanh-GELU (diffusers `GELU(approximate="tanh")`, param path `proj`)."""

    def __init__(self, proj: nnx.Linear):
        self.proj = proj

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """D -> ffn_dim -> D MLP; `net` = [GELUProj, dropout slot, Linear] so paths read net.0.proj / net.2."""

    def __init__(self, dim: int, ffn_dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List(
            [
                GELUProj(dense(dim, ffn_dim, ("embed", "mlp"), **kw)),
                nnx.Dropout(0.0),  # diffusers' (rate-0) dropout, kept only so indices match
                dense(ffn_dim, dim, ("mlp", "embed"), **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class DiTBlock(nnx.Module):
    """Modulated self-attention (3D RoPE), cross-attention to text, modulated MLP (diffusers block)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, f32 = cfg.dim, jnp.float32
        attn_kw = dict(
            qk_norm=cfg.qk_norm,
            eps=cfg.eps,
            impl=cfg.attention_impl,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.norm1 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.attn1 = WanAttention(d, cfg.num_heads, **attn_kw)
        self.norm2 = LayerNorm(d, eps=cfg.eps, affine=True, param_dtype=f32) if cfg.cross_attn_norm else None
        self.attn2 = WanAttention(d, cfg.num_heads, **attn_kw)
        self.norm3 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.ffn = FeedForward(d, cfg.ffn_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(logical(table_init, (None, None, "embed"))(rngs.params(), (1, 6, d), f32))

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        modulation: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        context_mask: jax.Array | None,
    ) -> jax.Array:
        """x (B, N, D), context (B, L, D), modulation (B, 6, D) float32, context_mask (B, L) -> (B, N, D)."""
        x = shard(x, ACT_BND)
        f32 = jnp.float32
        mod = self.scale_shift_table[...] + modulation  # (B, 6, D)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = jnp.split(mod, 6, axis=1)  # 6 x (B, 1, D)

        h = (self.norm1(x.astype(f32)) * (1 + scale_sa) + shift_sa).astype(x.dtype)
        x = (x.astype(f32) + self.attn1(h, rope=rope) * gate_sa).astype(x.dtype)

        h = x if self.norm2 is None else self.norm2(x.astype(f32)).astype(x.dtype)
        x = x + self.attn2(h, context, kv_mask=context_mask)

        h = (self.norm3(x.astype(f32)) * (1 + scale_ff) + shift_ff).astype(x.dtype)
        x = (x.astype(f32) + self.ffn(h).astype(f32) * gate_ff).astype(x.dtype)
        return shard(x, ACT_BND)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


def _stacked_blocks(cfg: DiTConfig, rngs: nnx.Rngs) -> DiTBlock:
    """num_layers independently initialised blocks stored as one DiTBlock with a leading "layers" axis."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(block_rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(cfg, rngs=block_rngs)

    return make(rngs.split(cfg.num_layers))


class WanDiT(nnx.Module):
    """Velocity model: latents (B, t, h, w, C_in), timesteps (B,) in [0, 1000], text (B, L, text_dim)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.dim, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.in_channels, d, **kw)
        self.condition_embedder = ConditionEmbedder(d, cfg.freq_dim, cfg.text_dim, **kw)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.norm_out = LayerNorm(d, eps=cfg.eps, affine=False)
        self.proj_out = dense(d, cfg.out_channels * math.prod(cfg.patch_size), ("embed", None), **kw)
        init = logical(table_init, (None, None, "embed"))
        self.scale_shift_table = nnx.Param(init(rngs.params(), (1, 2, d), jnp.float32))

    def __call__(
        self,
        latents: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predict velocity (B, t, h, w, C_out); context_mask (B, L) True for real text tokens."""
        cfg = self.cfg
        check_patchable(latents.shape, cfg.patch_size)
        if latents.shape[-1] != cfg.in_channels or context.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"expected latents (..., {cfg.in_channels}) and context (..., {cfg.text_dim}); "
                f"got {latents.shape} and {context.shape}"
            )
        grid = tuple(s // p for s, p in zip(latents.shape[1:4], cfg.patch_size))
        x = shard(self.patch_embedding(latents), ACT_BND)  # (B, N, D)
        temb, modulation, context = self.condition_embedder(timesteps, context.astype(cfg.dtype))
        rope = rope_3d(grid, cfg.head_dim, cfg.rope_theta)  # 2 x (N, K/2)
        x = self._run_blocks(x, context, modulation, rope, context_mask)

        shift, scale = jnp.split(self.scale_shift_table[...] + temb[:, None, :], 2, axis=1)  # 2 x (B, 1, D)
        x = (self.norm_out(x.astype(jnp.float32)) * (1 + scale) + shift).astype(x.dtype)
        x = self.proj_out(x)  # (B, N, pt*ph*pw*C_out)
        return unpatchify(x, grid, cfg.patch_size)  # (B, t, h, w, C_out)

    def _run_blocks(self, x, context, modulation, rope, context_mask) -> jax.Array:
        """Apply the stacked blocks with `nnx.scan` or a Python loop; both run the same (rematted) step."""
        cfg = self.cfg

        def step(block: DiTBlock, x: jax.Array, context, modulation, rope, context_mask) -> jax.Array:
            return block(x, context, modulation, rope, context_mask)

        if cfg.remat is not RematPolicy.NONE:
            step = nnx.remat(step, policy=_CHECKPOINT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        extras = (context, modulation, rope, context_mask)
        if cfg.scan_layers:
            scan = nnx.scan(
                step,
                in_axes=(0, nnx.Carry, None, None, None, None),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            return scan(self.blocks, x, *extras)
        graphdef, stacked = nnx.split(self.blocks)
        for i in range(cfg.num_layers):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
            x = step(block, x, *extras)
        return x
