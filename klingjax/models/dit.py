"""Wan 2.1-compatible video DiT (diffusers `WanTransformer3DModel`) in Flax NNX.

latents (B, t, h, w, C_in) -> patch tokens (B, N, D) -> num_layers x [self-attn with 3D RoPE, cross-attn to
text, MLP, each modulated by one shared time MLP + per-block tables] -> final modulated norm -> velocity
(B, t, h, w, C_out). Parameter paths mirror diffusers so the export map is mechanical; blocks are stored
stacked on a leading "layers" axis (scan-friendly) and run with `nnx.scan` or a Python loop.
Conditioning has one seam (DESIGN.md section 4): the model's condition step (`WanDiT.block_inputs`) turns the
timesteps and a `Conditions` pytree into one `BlockInputs` tuple that every block reads; the static
`ConditionSpec` in DiTConfig says which conditions exist (`ConditionSpec()` = Wan T2V, no extra params).
Masked video (`ConditionSpec.masked_video`, see conditions.MaskedVideo): PER_TOKEN_TIMESTEPS modulates the tokens
whose patch is wholly given at t = 0 (every block and the final layer; no params); CHANNEL_CONCAT adds
[given * mask, mask] to the patch embedding through a zero-initialised `patch_embedding.cond_kernel`.

Ablation switches (defaults = Wan 2.1; any other setting cannot be exported to diffusers):
  * `AttentionLayout.FACTORIZED`: each block runs spatial self-attention within every frame (2D part of the
    RoPE) and then temporal self-attention across frames at every location (temporal part), each with its
    own modulated, gated residual. Extra params per block: `attn_t` (a WanAttention with its own QK norms)
    and `scale_shift_table_t` (1, 3, D), its per-block (shift, scale, gate) offsets added to the time
    modulation that the spatial attention also uses (no new time projection: that would add 3 D^2 per block).
  * `TextAttention.JOINT` (MM-DiT style): text keys/values are appended to the (spatial) self-attention and
    there is no cross-attention block (`attn2`, `norm2` are dropped). The text stream is a fixed context: it
    is projected once by the text embedder and never updated (only video tokens query), which keeps one
    residual stream and composes with FACTORIZED (each frame attends to the caption). The text gets its own
    projections per block, `text_kv` = {to_k, to_v, norm_k} (its features differ from video features, as in
    SD3's per-modality weights); text keys are not rotated (identity rows in the key RoPE table) and padded
    text keys are masked.
Neighbours: conditions.py, dit_inputs.py, layers/ (attention, rope, norms, embeddings), diffusion/ (what the
velocity means).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klingjax.models.conditions import CameraCondition, Conditions, MaskedVideo
from klingjax.models.dit_config import (  # noqa: F401 - re-exported: the DiT's config API
    DIT_VARIANTS,
    AttentionLayout,
    DiTConfig,
    RematPolicy,
    TextAttention,
    dit_config,
)
from klingjax.models.dit_inputs import (
    FACTORIZED_POSITIONS_ERROR,
    BlockInputs,
    RopeTables,
    block_rope,
    channel_condition,
    given_tokens,
    joint_kv_mask,
    modulation_chunks,
)
from klingjax.models.layers.adapters import CameraEmbedder, CameraGate, IntervalEmbedder
from klingjax.models.layers.attention import WanAttention, attention, dense, table_init
from klingjax.models.layers.embeddings import ConditionEmbedder, PatchEmbed, check_patchable, unpatchify
from klingjax.models.layers.lora import add_lora
from klingjax.models.layers.norms import LayerNorm, RMSNorm, logical
from klingjax.models.layers.rope import apply_rope
from klingjax.sharding.context_parallel import context_parallel_enabled
from klingjax.sharding.rules import current_rules, shard

ACT_BND = ("act_batch", "act_length", "act_embed")
# Zero-initialised condition adapters (module names): a model with them can start from a checkpoint without them
# (`init_from` keeps their init), since at init they leave the base model's output unchanged.
ADAPTER_PARAMS = ("camera_embedder", "camera_proj", "camera_gate", "interval_embedder")


# ---------------------------------------------------------------------------------------------------------
# Remat policies (the config, its enums and variants: dit_config.py)
# ---------------------------------------------------------------------------------------------------------


_CHECKPOINT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS_SAVEABLE: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------------------
# Joint text attention
# ---------------------------------------------------------------------------------------------------------


class TextKV(nnx.Module):
    """The text stream's own key/value projections (and key RMSNorm) for JOINT text attention."""

    def __init__(self, dim: int, *, qk_norm: bool, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_k = dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = dense(dim, dim, ("embed", "heads"), **kw)
        self.norm_k = RMSNorm(dim, eps=eps, param_dtype=param_dtype) if qk_norm else None

    def __call__(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """text (B, L, D) -> keys, values (B, L, D)."""
        k = self.to_k(text)
        return (k if self.norm_k is None else self.norm_k(k)), self.to_v(text)


def joint_attention(attn: WanAttention, x: jax.Array, text_kv: tuple[jax.Array, jax.Array], rope: RopeTables,
                    kv_mask: jax.Array | None) -> jax.Array:
    """Self-attention of x (S, n, D) over keys/values [x; text] (S, n + L, D); kv_mask (S, n|1, n + L) or None."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # 3 x (S, n, D)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    k = jnp.concatenate([k, text_kv[0]], axis=1)  # (S, n + L, D)
    v = jnp.concatenate([v, text_kv[1]], axis=1)  # (S, n + L, D)
    s, n, d = q.shape
    heads = lambda a: a.reshape(s, a.shape[1], attn.num_heads, d // attn.num_heads)  # (S, len, H, K)
    q, k = apply_rope(heads(q), *rope.q), apply_rope(heads(k), *rope.k)
    out = attention(q, k, heads(v), kv_mask, attn.impl)  # (S, n, H, K)
    return attn.to_out[0](out.reshape(s, n, d))  # (S, n, D)


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
    """Modulated self-attention (3D RoPE), cross-attention to text, modulated MLP (diffusers block).

    FACTORIZED splits the self-attention into a spatial and a temporal one; JOINT text replaces the
    cross-attention by text keys/values in the (spatial) self-attention (see the module docstring).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, f32 = cfg.dim, jnp.float32
        attn_kw = dict(qk_norm=cfg.qk_norm, eps=cfg.eps, impl=cfg.attention_impl, context_parallel=cfg.context_parallel,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        cross = cfg.text_attention is TextAttention.CROSS
        # Default modules first, in their original order, so the default init draws the same random numbers.
        self.norm1 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.attn1 = WanAttention(d, cfg.num_heads, **attn_kw)
        norm2 = cross and cfg.cross_attn_norm
        self.norm2 = LayerNorm(d, eps=cfg.eps, affine=True, param_dtype=f32) if norm2 else None
        self.attn2 = WanAttention(d, cfg.num_heads, **attn_kw) if cross else None
        self.norm3 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.ffn = FeedForward(d, cfg.ffn_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        table = logical(table_init, (None, None, "embed"))
        self.scale_shift_table = nnx.Param(table(rngs.params(), (1, 6, d), f32))
        factorized = cfg.attention_layout is AttentionLayout.FACTORIZED
        self.attn_t = WanAttention(d, cfg.num_heads, **attn_kw) if factorized else None
        # (shift, scale, gate) offsets of the temporal attention; its parameter-free LayerNorm is norm1's.
        self.scale_shift_table_t = nnx.Param(table(rngs.params(), (1, 3, d), f32)) if factorized else None
        attn_kw.pop("impl"), attn_kw.pop("context_parallel")
        self.text_kv = None if cross else TextKV(d, **attn_kw)
        camera = cfg.conditions.camera is not CameraCondition.OFF  # zero-initialised: the block starts as without it
        self.camera_proj = dense(d, d, ("embed", "mlp"), kernel_init=nnx.initializers.zeros, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs) if camera else None
        self.camera_gate = CameraGate(jnp.ones((), jnp.float32)) if camera else None  # 0: this block ignores it

    def __call__(self, x: jax.Array, inputs: BlockInputs) -> jax.Array:
        """x (B, N, D) and the shared `BlockInputs` (text, per-query text mask, modulation, RoPE) -> (B, N, D)."""
        x = shard(x, ACT_BND)
        f32 = jnp.float32
        if self.camera_proj is not None and inputs.camera is not None:
            x = x + (self.camera_proj(inputs.camera) * self.camera_gate[...]).astype(x.dtype)
        modulation, clean, given = inputs.modulation, inputs.given_modulation, inputs.given_tokens  # (B, 6, D) ...
        # 6 x (B, 1, D); with per-token timesteps 6 x (B, N, D) (given tokens modulated at t = 0)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation_chunks(
            self.scale_shift_table[...], modulation, clean, given)

        h = (self.norm1(x.astype(f32)) * (1 + scale_sa) + shift_sa).astype(x.dtype)
        x = (x.astype(f32) + self.self_attention(h, inputs) * gate_sa).astype(x.dtype)

        if self.attn_t is not None:
            # 3 x (B, 1|N, D): offsets on the same time signal
            shift_t, scale_t, gate_t = modulation_chunks(self.scale_shift_table_t[...], modulation[:, :3],
                                                         None if clean is None else clean[:, :3], given)
            h = (self.norm1(x.astype(f32)) * (1 + scale_t) + shift_t).astype(x.dtype)
            x = (x.astype(f32) + self.temporal_attention(h, inputs.rope) * gate_t).astype(x.dtype)

        if self.attn2 is not None:
            h = x if self.norm2 is None else self.norm2(x.astype(f32)).astype(x.dtype)
            x = x + self.attn2(h, inputs.context, kv_mask=inputs.context_mask)  # mask (B, N|1, L) per query

        h = (self.norm3(x.astype(f32)) * (1 + scale_ff) + shift_ff).astype(x.dtype)
        x = (x.astype(f32) + self.ffn(h).astype(f32) * gate_ff).astype(x.dtype)
        return shard(x, ACT_BND)

    def self_attention(self, h: jax.Array, inputs: BlockInputs) -> jax.Array:
        """The first self-attention of (B, N, D): over the clip (JOINT_3D) or within each frame (FACTORIZED)."""
        rope = inputs.rope
        if self.attn_t is None and self.text_kv is None:
            return self.attn1(h, rope=rope.q)  # Wan 2.1
        b, n, d = h.shape
        hw = rope.q[0].shape[-2]  # tokens per attended sequence: N (JOINT_3D) or h*w (FACTORIZED)
        frames = n // hw  # 1 (JOINT_3D) or t (FACTORIZED)
        h = h.reshape(b * frames, hw, d)  # (B*t, h*w, D); token order is (t, h, w) row-major
        if self.text_kv is None:
            out = self.attn1(h, rope=rope.q)
        else:
            text_kv = [jnp.repeat(a, frames, axis=0) for a in self.text_kv(inputs.context)]  # 2 x (B*t, L, D)
            kv_mask = joint_kv_mask(inputs.context_mask, frames, hw)  # (B*t, h*w|1, h*w + L) or None
            out = joint_attention(self.attn1, h, text_kv, rope, kv_mask)
        return out.reshape(b, n, d)  # (B, N, D)

    def temporal_attention(self, h: jax.Array, rope: RopeTables) -> jax.Array:
        """FACTORIZED: attention across the t frames at each (h, w) location of (B, N, D) tokens."""
        b, n, d = h.shape
        t = rope.temporal[0].shape[0]
        h = h.reshape(b, t, n // t, d).transpose(0, 2, 1, 3)  # (B, h*w, t, D)
        out = self.attn_t(h.reshape(b * (n // t), t, d), rope=rope.temporal)  # (B*h*w, t, D)
        return out.reshape(b, n // t, t, d).transpose(0, 2, 1, 3).reshape(b, n, d)  # (B, N, D)


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
    """Velocity model: latents (B, t, h, w, C_in), timesteps (B,) in [0, 1000], `Conditions` (text, ...)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.dim, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        cond_channels = cfg.conditions.patch_channels(cfg.in_channels) - cfg.in_channels  # CHANNEL_CONCAT: C + 1
        self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.in_channels, d, cond_channels=cond_channels, **kw)
        self.condition_embedder = ConditionEmbedder(d, cfg.freq_dim, cfg.text_dim, **kw)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.norm_out = LayerNorm(d, eps=cfg.eps, affine=False)
        self.proj_out = dense(d, cfg.out_channels * math.prod(cfg.patch_size), ("embed", None), **kw)
        init = logical(table_init, (None, None, "embed"))
        self.scale_shift_table = nnx.Param(init(rngs.params(), (1, 2, d), jnp.float32))
        # Condition adapters are drawn after the base params, so those are the text-to-video model's.
        camera = cfg.conditions.camera is not CameraCondition.OFF
        self.camera_embedder = CameraEmbedder(d, **kw) if camera else None
        if cfg.conditions.camera is CameraCondition.FIRST_BLOCKS:
            self.blocks.camera_gate[...] = (jnp.arange(cfg.num_layers) < cfg.conditions.camera_blocks).astype(
                jnp.float32)
        self.interval_embedder = (IntervalEmbedder(cfg.freq_dim, d, param_dtype=cfg.param_dtype, rngs=rngs)
                                  if cfg.conditions.flow_map else None)
        if cfg.lora is not None:  # drawn last: the base params are those of the model without LoRA
            add_lora(self, cfg.lora, rngs)

    def __call__(self, latents: jax.Array, timesteps: jax.Array, cond: Conditions) -> jax.Array:
        """Predict velocity (B, t, h, w, C_out) of `latents` at `timesteps` (B,) given the conditions `cond`."""
        cfg = self.cfg
        check_patchable(latents.shape, cfg.patch_size)
        grid = tuple(s // p for s, p in zip(latents.shape[1:4], cfg.patch_size))
        cfg.conditions.validate(cond, num_tokens=math.prod(grid), latent_shape=latents.shape)
        if latents.shape[-1] != cfg.in_channels or cond.text.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"expected latents (..., {cfg.in_channels}) and Conditions.text (..., {cfg.text_dim}); "
                f"got {latents.shape} and {cond.text.shape}"
            )
        if cond.positions is not None and cfg.attention_layout is AttentionLayout.FACTORIZED:
            raise ValueError(FACTORIZED_POSITIONS_ERROR)
        non_default = (cfg.attention_layout, cfg.text_attention) != (AttentionLayout.JOINT_3D, TextAttention.CROSS)
        if non_default and context_parallel_enabled(jax.sharding.get_abstract_mesh(), current_rules()):
            raise ValueError(
                f"context parallelism (mesh 'context' axis > 1) supports only attention_layout=joint_3d with "
                f"text_attention=cross; got {cfg.attention_layout.value} / {cfg.text_attention.value}: "
                "set mesh.context=1 or the default attention switches")
        extra = None
        if cfg.conditions.masked_video is MaskedVideo.CHANNEL_CONCAT:
            extra = channel_condition(cond.given, cond.given_mask, latents)  # (B, t, h, w, C + 1)
        x = shard(self.patch_embedding(latents, extra), ACT_BND)  # (B, N, D)
        (temb, clean_temb), inputs = self.block_inputs(timesteps, cond, grid)
        x = self._run_blocks(x, inputs)

        shift, scale = modulation_chunks(self.scale_shift_table[...], temb[:, None, :],  # 2 x (B, 1|N, D)
                                         None if clean_temb is None else clean_temb[:, None, :], inputs.given_tokens)
        x = (self.norm_out(x.astype(jnp.float32)) * (1 + scale) + shift).astype(x.dtype)
        x = self.proj_out(x)  # (B, N, pt*ph*pw*C_out)
        return unpatchify(x, grid, cfg.patch_size)  # (B, t, h, w, C_out)

    def block_inputs(self, timesteps: jax.Array, cond: Conditions,
                     grid: tuple[int, int, int]) -> tuple[tuple[jax.Array, jax.Array | None], BlockInputs]:
        """The condition step: timesteps (B,) + `cond` on a (t, h, w) token grid -> (temb, clean temb), `BlockInputs`.

        temb (B, D) feeds the final layer; clean temb (B, D) is the t = 0 one of given tokens (PER_TOKEN_TIMESTEPS
        with a given_mask; else None). With `ConditionSpec()` this is Wan's condition embedder and 3D RoPE; later
        conditions add their zero-initialised adapters here and fill more `BlockInputs` fields, never the blocks'
        signature.
        """
        cfg = self.cfg
        jump = None
        if self.interval_embedder is not None:  # a flow-map student; no interval given: the instantaneous velocity
            interval = cond.interval if cond.interval is not None else jnp.zeros(timesteps.shape, jnp.float32)
            jump = self.interval_embedder(interval)  # (B, D), 0 at init
        temb, modulation, context = self.condition_embedder(timesteps, cond.text.astype(cfg.dtype), jump)
        clean_temb = clean_mod = tokens = None
        if cfg.conditions.masked_video is MaskedVideo.PER_TOKEN_TIMESTEPS and cond.given_mask is not None:
            # Only two timesteps exist per clip (t and the given tokens' 0, or their noise level `given_time`), so
            # the time MLP runs on those, not on every token.
            given_t = jnp.zeros_like(timesteps) if cond.given_time is None else cond.given_time * 1000.0
            clean_temb, clean_mod = self.condition_embedder.embed_time(given_t.astype(timesteps.dtype))
            tokens = given_tokens(cond.given_mask, cfg.patch_size)  # (B, N, 1)
        factorized = cfg.attention_layout is AttentionLayout.FACTORIZED
        text_len = context.shape[1] if cfg.text_attention is TextAttention.JOINT else None  # JOINT: text keys
        rope = block_rope(grid, cfg.head_dim, cfg.rope_theta, factorized=factorized, text_len=text_len,
                          positions=cond.positions)  # tables per self-attention, see RopeTables
        mask = None if cond.text_mask is None else cond.text_mask.astype(bool)[:, None, :]  # (B, 1, L): all queries
        camera = None
        if self.camera_embedder is not None:
            # A model with a camera adapter and no camera path given sees a static camera (all zeros).
            path = cond.camera if cond.camera is not None else jnp.zeros((timesteps.shape[0], grid[0], 4))
            frames = self.camera_embedder(path[:, ::cfg.patch_size[0]].astype(jnp.float32))  # (B, t', D)
            camera = jnp.repeat(frames, grid[1] * grid[2], axis=1).astype(cfg.dtype)  # (B, N, D), (t, h, w) order
        return (temb, clean_temb), BlockInputs(context, mask, modulation, rope, tokens, clean_mod, camera)

    def _run_blocks(self, x: jax.Array, inputs: BlockInputs) -> jax.Array:
        """Apply the stacked blocks with `nnx.scan` or a Python loop; both run the same (rematted) step."""
        cfg = self.cfg

        def step(block: DiTBlock, x: jax.Array, inputs: BlockInputs) -> jax.Array:
            return block(x, inputs)

        if cfg.remat is not RematPolicy.NONE:
            step = nnx.remat(step, policy=_CHECKPOINT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # `inputs` is one broadcast argument: adding a condition never changes these axes.
            scan = nnx.scan(step, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry,
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(self.blocks, x, inputs)
        graphdef, stacked = nnx.split(self.blocks)
        for i in range(cfg.num_layers):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
            x = step(block, x, inputs)
        return x
