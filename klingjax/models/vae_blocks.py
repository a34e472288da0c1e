"""Building blocks of the Wan 2.1 causal VAE, named as in diffusers' `autoencoder_kl_wan.py`.

Every block is called as `block(x, cache=None, ...) -> (y, new_cache)` with x channels-last
(B, T, H, W, C). `cache` is a pytree of the frames each causal conv needs from the previous chunk;
`None` means "start of clip" (zero padding). The returned cache always has the same structure and
shapes, so chunked (streaming) calls can be carried through `jax.lax.scan`.

`first=True` marks a call whose first frame is the clip's first frame. Wan treats that frame specially
in its temporal resamplers: downsample3d passes it through untouched (later frames use a stride-2 conv
over [previous frame, frame pair]), and upsample3d emits it as a single frame (later frames double).
"""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from klingjax.models.layers.conv3d import CausalConv3d, FrameConv2d, WanRMSNorm
from klingjax.sharding.rules import shard

Cache = Any  # a pytree of (B, n, H, W, C) arrays (and Nones), mirroring the module tree
# Logical axes of every (B, T, H, W, C) activation; the VAE rules map act_height to "context" (spatial split).
ACT_AXES = ("act_batch", "act_frames", "act_height", "act_width", "act_channels")


def sub(cache: Cache, key: str | int) -> Cache:
    """The child cache at `key`, or None at the start of a clip."""
    return None if cache is None else cache[key]


class ResampleMode(enum.Enum):
    """The four Wan resamplers; "3d" ones also resample time (x2) with a causal `time_conv`."""

    UPSAMPLE2D = "upsample2d"
    UPSAMPLE3D = "upsample3d"
    DOWNSAMPLE2D = "downsample2d"
    DOWNSAMPLE3D = "downsample3d"


class WanResidualBlock(nnx.Module):
    """norm-SiLU-conv twice plus a (1x1x1 conv) shortcut: (B, T, H, W, in_dim) -> (B, T, H, W, out_dim)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        dropout: float = 0.0,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = WanRMSNorm(in_dim, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), **kw)
        self.norm2 = WanRMSNorm(out_dim, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), **kw)
        self.conv_shortcut = (
            CausalConv3d(in_dim, out_dim, (1, 1, 1), padding=(0, 0, 0), **kw) if in_dim != out_dim else None
        )

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        """Returns (y, {"conv1": ..., "conv2": ...})."""
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), sub(cache, "conv1"))
        x = self.dropout(jax.nn.silu(self.norm2(x)))
        x, c2 = self.conv2(x, sub(cache, "conv2"))
        return x + h, {"conv1": c1, "conv2": c2}


def _zeros_init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


class WanAttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (no temporal mixing): (B, T, H, W, C) -> same."""

    def __init__(
        self, dim: int, *, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(kernel_size=1, padding=((0, 0), (0, 0)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = WanRMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
        self.to_qkv = FrameConv2d(dim, 3 * dim, **kw)
        # Zero-initialised output (as Wan's original AttentionBlock): at init, near-uniform attention would add
        # one pooled vector to every pixel, which channel-RMS-norm then turns into a mean-image trap.
        self.proj = FrameConv2d(dim, dim, kernel_init=_zeros_init, **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        """Returns (y, None): attention needs no frame cache."""
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)  # (B*T, HW, 1 head, 3C)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each (B*T, HW, 1, C)
        y = jax.nn.dot_product_attention(q, k, v)  # (B*T, HW, 1, C)
        y = self.proj(y.reshape(b, t, h, w, c))  # (B, T, H, W, C)
        return x + y, None


def _nearest_up2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x spatial upsampling (== torch "nearest-exact" at scale 2): (B,T,H,W,C)->(B,T,2H,2W,C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class WanResample(nnx.Module):
    """Wan's resampler: 2x spatial up/down (per-frame conv), plus 2x temporal via `time_conv` in "3d" modes."""

    def __init__(
        self,
        dim: int,
        mode: ResampleMode,
        *,
        upsample_out_dim: int | None = None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        self.upsample = mode in (ResampleMode.UPSAMPLE2D, ResampleMode.UPSAMPLE3D)
        if self.upsample:
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = FrameConv2d(dim, out, 3, padding=((1, 1), (1, 1)), **kw)
        else:
            # ZeroPad2d((0, 1, 0, 1)) then a valid stride-2 conv: pad bottom and right only.
            self.resample = FrameConv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        if mode is ResampleMode.UPSAMPLE3D:
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode is ResampleMode.DOWNSAMPLE3D:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0), **kw)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: Cache = None, *, first: bool = False) -> tuple[jax.Array, Cache]:
        """(B, T, H, W, C) -> (B, T', H', W', C'); T' = 1 + 2(T-1) (up3d), 1 + (T-1)/2 (down3d), T otherwise."""
        if self.mode is ResampleMode.UPSAMPLE3D:
            x, cache = self._time_upsample(x, cache, first)
        if self.upsample:
            x = _nearest_up2(x)  # (B, T, 2H, 2W, C)
        x = self.resample(x)
        if self.mode is ResampleMode.DOWNSAMPLE3D:
            x, cache = self._time_downsample(x, cache, first)
        return x, cache

    def _time_upsample(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
        """Frame 0 of the clip passes as one frame; every later frame becomes two via a causal conv to 2C."""
        head, rest = (x[:, :1], x[:, 1:]) if first else (None, x)
        if rest.shape[1] == 0:  # a lone first frame: the time_conv cache stays at its zero start state
            new_cache = jnp.zeros((x.shape[0], self.time_conv.pad_t, *x.shape[2:]), x.dtype)
            return head, new_cache
        b, t, h, w, c = rest.shape
        y, new_cache = self.time_conv(rest, cache)  # (B, T, H, W, 2C)
        y = y.reshape(b, t, h, w, 2, c)  # (B, T, H, W, 2, C): channel half k is output frame 2i+k
        y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c)  # (B, 2T, H, W, C)
        if head is not None:
            y = jnp.concatenate([head.astype(y.dtype), y], axis=1)  # (B, 1 + 2T, H, W, C)
        return y, new_cache

    def _time_downsample(self, x: jax.Array, cache: Cache, first: bool) -> tuple[jax.Array, Cache]:
        """Frame 0 of the clip passes untouched; later frame pairs (2i-1, 2i) plus frame 2i-2 -> one frame."""
        head = None
        if first:
            head, cache, x = x[:, :1], x[:, :1], x[:, 1:]  # the cache holds the last frame seen
        if x.shape[1] == 0:
            return head, cache
        y, _ = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))  # (B, T/2, H, W, C)
        new_cache = x[:, -1:]  # (B, 1, H, W, C)
        if head is not None:
            y = jnp.concatenate([head, y], axis=1)  # (B, 1 + T/2, H, W, C)
        return y, new_cache


class WanMidBlock(nnx.Module):
    """resnet, then (attention, resnet) x num_layers, at constant width: (B, T, H, W, C) -> same."""

    def __init__(
        self,
        dim: int,
        *,
        dropout: float = 0.0,
        num_layers: int = 1,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([WanResidualBlock(dim, dim, dropout=dropout, **kw) for _ in range(num_layers + 1)])
        self.attentions = nnx.List([WanAttentionBlock(dim, **kw) for _ in range(num_layers)])

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        """Returns (y, {"resnets": [...]})."""
        x, c0 = self.resnets[0](x, sub(sub(cache, "resnets"), 0))
        caches = [c0]
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
            x, _ = attn(shard(x, ACT_AXES))
            x, c = resnet(shard(x, ACT_AXES), sub(sub(cache, "resnets"), i + 1))
            caches.append(c)
        return x, {"resnets": caches}


class WanUpBlock(nnx.Module):
    """Decoder stage: (num_res_blocks + 1) resnets then an optional upsampler in `upsamplers[0]`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        *,
        dropout: float = 0.0,
        upsample_mode: ResampleMode | None = None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([WanResidualBlock(i, o, dropout=dropout, **kw) for i, o in zip(dims[:-1], dims[1:])])
        up = None if upsample_mode is None else nnx.List([WanResample(out_dim, upsample_mode, **kw)])
        self.upsamplers = up

    def __call__(self, x: jax.Array, cache: Cache = None, *, first: bool = False) -> tuple[jax.Array, Cache]:
        """Returns (y, {"resnets": [...], "upsamplers": [...]})."""
        caches = []
        for i, resnet in enumerate(self.resnets):
            x, c = resnet(x, sub(sub(cache, "resnets"), i))
            x = shard(x, ACT_AXES)  # the largest activations of the VAE live here (full-resolution stages)
            caches.append(c)
        up_caches = []
        if self.upsamplers is not None:
            x, c = self.upsamplers[0](x, sub(sub(cache, "upsamplers"), 0), first=first)
            up_caches.append(c)
        return x, {"resnets": caches, "upsamplers": up_caches}
