"""Input embeddings of the Wan DiT: 3D patch embedding (+ unpatchify), sinusoidal timesteps, time/text MLPs.

Names mirror diffusers: `patch_embedding` (a Conv3d with kernel = stride = patch, here a reshape + einsum
with kernel (pt, ph, pw, C, D) = torch weight.permute(2, 3, 4, 1, 0)), and `condition_embedder` holding
`time_embedder.linear_1/2`, `time_proj` and `text_embedder.linear_1/2`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from klingjax.models.layers.attention import BIAS_INIT, EMBEDDER_INIT, PATCH_INIT, dense
from klingjax.models.layers.norms import logical

Patch = tuple[int, int, int]


def check_patchable(latents_shape: tuple[int, ...], patch: Patch) -> None:
    """Raise ValueError unless the (t, h, w) axes of a (B, t, h, w, C) shape are divisible by `patch`."""
    thw = tuple(latents_shape[1:4])
    if len(latents_shape) != 5 or any(s % p for s, p in zip(thw, patch)):
        raise ValueError(
            f"latents must be (B, t, h, w, C) with t, h, w divisible by patch_size {tuple(patch)}; "
            f"got shape {tuple(latents_shape)}"
        )


def patchify(x: jax.Array, patch: Patch) -> jax.Array:
    """(B, t, h, w, C) -> (B, t/pt, h/ph, w/pw, pt*ph*pw*C), patch features ordered (pt, ph, pw, C)."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)  # (B, T, pt, H, ph, W, pw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T, H, W, pt, ph, pw, C)
    return x.reshape(b, t // pt, h // ph, w // pw, pt * ph * pw * c)  # (B, T, H, W, P*C)


def unpatchify(x: jax.Array, grid: tuple[int, int, int], patch: Patch) -> jax.Array:
    """(B, N, pt*ph*pw*C) tokens on a (T, H, W) grid -> (B, T*pt, H*ph, W*pw, C); inverse of `patchify`."""
    b = x.shape[0]
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    x = x.reshape(b, gt, gh, gw, pt, ph, pw, -1)  # (B, T, H, W, pt, ph, pw, C)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # (B, T, pt, H, ph, W, pw, C)
    return x.reshape(b, gt * pt, gh * ph, gw * pw, x.shape[-1])  # (B, t, h, w, C)


class PatchEmbed(nnx.Module):
    """Non-overlapping 3D patch embedding: (B, t, h, w, C) -> tokens (B, N, D) on the (T, H, W) grid.

    cond_channels > 0 adds `cond_kernel` (pt, ph, pw, cond_channels, D), zero-initialised (it draws no random
    numbers, so every other parameter is initialised as without it), read from a second input of the same grid:
    channel-concat conditioning whose model equals the unconditioned one at init.
    """

    def __init__(
        self,
        patch: Patch,
        in_channels: int,
        dim: int,
        *,
        cond_channels: int = 0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.patch = tuple(patch)
        self.dtype = dtype
        axes = ("conv_t", "conv_h", "conv_w", "conv_in", "embed")
        self.kernel = nnx.Param(logical(PATCH_INIT, axes)(rngs.params(), (*self.patch, in_channels, dim), param_dtype))
        self.bias = nnx.Param(logical(BIAS_INIT, ("embed",))(rngs.params(), (dim,), param_dtype))
        zeros = logical(nnx.initializers.zeros, axes)
        cond_shape = (*self.patch, cond_channels, dim)
        self.cond_kernel = nnx.Param(zeros(None, cond_shape, param_dtype)) if cond_channels else None

    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """x (B, t, h, w, C) [and cond (B, t, h, w, cond_channels) when `cond_kernel` exists] -> (B, N, D)."""
        tokens = self._project(x, self.kernel)  # (B, N, D)
        if self.cond_kernel is not None:
            if cond is None or cond.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"this patch embedding also reads a conditioning input of shape {x.shape[:-1]} + "
                                 f"(C,); got {None if cond is None else cond.shape}")
            tokens = tokens + self._project(cond, self.cond_kernel)  # zero at init: exactly the tokens above
        return tokens + self.bias[...].astype(self.dtype)

    def _project(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
        p = patchify(x.astype(self.dtype), self.patch)  # (B, T, H, W, pt*ph*pw*C)
        b, gt, gh, gw, _ = p.shape
        p = p.reshape(b, gt * gh * gw, *self.patch, -1)  # (B, N, pt, ph, pw, C)
        return jnp.einsum("bnxyzc,xyzcd->bnd", p, kernel[...].astype(self.dtype))  # (B, N, D)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) as [cos, sin] (diffusers `Timesteps(flip_sin_to_cos=True)`)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # (dim/2,)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # (B, dim/2)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, dim)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 on the sinusoidal features (diffusers `TimestepEmbedding`), in float32."""

    def __init__(self, in_features: int, dim: int, *, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype, kernel_init=EMBEDDER_INIT)
        self.linear_1 = dense(in_features, dim, (None, "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("embed", None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """linear_1 -> GELU(tanh) -> linear_2 from text_dim to dim (diffusers `PixArtAlphaTextProjection`)."""

    def __init__(
        self,
        text_dim: int,
        dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=EMBEDDER_INIT)
        self.linear_1 = dense(text_dim, dim, ("text_embed", "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("embed", None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=True))


class ConditionEmbedder(nnx.Module):
    """Timesteps (B,) and text (B, L, text_dim) -> temb (B, D), modulation (B, 6, D), context (B, L, D)."""

    def __init__(
        self,
        dim: int,
        freq_dim: int,
        text_dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim, param_dtype=param_dtype, rngs=rngs)
        # One shared projection to the 6 modulation vectors of every block (kept in float32 like diffusers).
        self.time_proj = dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.text_embedder = TextProjection(text_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, timesteps: jax.Array, context: jax.Array,
                 extra: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        temb, modulation = self.embed_time(timesteps, extra)
        return temb, modulation, self.text_embedder(context)

    def embed_time(self, timesteps: jax.Array, extra: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Timesteps (B,) -> temb (B, D), modulation (B, 6, D), both float32; `extra` (B, D) is added to temb before
        the modulation projection (a flow-map student's jump-length embedding)."""
        temb = self.time_embedder(timestep_embedding(timesteps, self.freq_dim))  # (B, D) float32
        if extra is not None:
            temb = temb + extra.astype(temb.dtype)
        modulation = self.time_proj(jax.nn.silu(temb))  # (B, 6D)
        return temb, modulation.reshape(modulation.shape[0], 6, -1)  # (B, D), (B, 6, D)
