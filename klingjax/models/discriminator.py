"""A 3D PatchGAN discriminator for VAE training: video (B, T, H, W, 3) -> a map of real/fake logits.

The 3D analogue of taming-transformers' `NLayerDiscriminator` (pix2pix's PatchGAN): `num_layers` strided
convolutions (kernel 3x4x4, stride 2 on every axis, channels doubling up to 8x `dim`), one stride-1 convolution,
and a stride-1 convolution to one logit per patch. GroupNorm (no batch statistics, so no mutable state) and
LeakyReLU(0.2) follow every convolution but the first and the last. Convolutions are causal in time (zero
padding in front), like the VAE's, so a 1-frame video (an image) is a valid input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from klingjax.models.layers.conv3d import (
    BIAS_AXES,
    CONV3D_AXES,
    NORM_AXES,
    _conv2d_frames,
    default_kernel_init,
    logical_param,
)

_MAX_MULT = 8  # taming's cap on the channel multiplier


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of the 3D PatchGAN discriminator."""

    dim: int = 32  # channels of the first convolution
    num_layers: int = 3  # strided (downsampling) convolutions
    in_channels: int = 3
    kernel_size: tuple[int, int, int] = (3, 4, 4)  # (kt, kh, kw)
    norm_groups: int = 32  # GroupNorm groups (capped by the channels); 0: no normalisation
    negative_slope: float = 0.2

    def __post_init__(self):
        if self.dim < 1 or self.num_layers < 1:
            raise ValueError(f"discriminator dim={self.dim} and num_layers={self.num_layers} must be >= 1")

    def channels(self) -> list[int]:
        """Output channels of every convolution, the final 1-logit one included."""
        return [self.dim * min(2**n, _MAX_MULT) for n in range(self.num_layers + 1)] + [1]

    def output_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """(t', h', w') of the logit map for (t, h, w) inputs; a 0 means the frames are too small."""
        kt, kh, kw = self.kernel_size
        for s in [2] * self.num_layers + [1, 1]:
            t = (t - 1) // s + 1  # causal padding kt - 1: (t + kt - 1 - kt) // s + 1
            h = max(0, (h + 2 * ((kh - 2) // 2) - kh) // s + 1)
            w = max(0, (w + 2 * ((kw - 2) // 2) - kw) // s + 1)
        return t, h, w


class PatchConv3d(nnx.Module):
    """Causal-in-time 3D conv with strides on every axis: (B, T, H, W, Cin) -> (B, T', H', W', Cout).

    Spatial padding is (kh - 2) // 2 per side, so stride 2 halves H and W as in taming (k=4, pad=1).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: tuple[int, int, int], *,
                 stride: int, param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.kernel = logical_param(default_kernel_init, CONV3D_AXES, rngs.params(),
                                    (*kernel_size, in_features, out_features), param_dtype)
        self.bias = logical_param(nnx.initializers.zeros, BIAS_AXES, rngs.params(), (out_features,), param_dtype)
        self.stride = stride
        self.pad_hw = ((kernel_size[1] - 2) // 2, (kernel_size[2] - 2) // 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw, cin, cout = self.kernel.shape
        s = self.stride
        x = jnp.pad(x, ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)))  # (B, kt-1 + T, H, W, Cin): causal
        t_out = (x.shape[1] - kt) // s + 1
        span = s * (t_out - 1) + 1
        # Fold the temporal taps into channels (fast on CPU, as CausalConv3d): output frame j reads j*s + i.
        taps = jnp.concatenate([x[:, i : i + span : s] for i in range(kt)], axis=-1)  # (B, T', H, W, kt*Cin)
        k2d = jnp.transpose(self.kernel[...], (1, 2, 0, 3, 4)).reshape(kh, kw, kt * cin, cout)  # (kh, kw, kt*Cin, Cout)
        ph, pw = self.pad_hw
        y = _conv2d_frames(taps, k2d, s, ((ph, ph), (pw, pw)))  # (B, T', H', W', Cout)
        return y + self.bias[...]


class GroupNorm(nnx.Module):
    """GroupNorm over (T, H, W, C / groups) per clip: (B, T, H, W, C) -> same; float32 statistics."""

    def __init__(self, dim: int, groups: int, *, param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        if dim % groups:
            raise ValueError(f"GroupNorm: {dim} channels do not split into {groups} groups")
        self.groups = groups
        self.scale = logical_param(nnx.initializers.ones, NORM_AXES, rngs.params(), (dim,), param_dtype)
        self.bias = logical_param(nnx.initializers.zeros, NORM_AXES, rngs.params(), (dim,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        h = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)  # (B, T*H*W, G, C/G)
        mean = jnp.mean(h, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=(1, 3), keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)  # (B, T, H, W, C)
        return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


class PatchDiscriminator3D(nnx.Module):
    """Video (B, T, H, W, in_channels) in [-1, 1] -> patch logits (B, T', H', W', 1)."""

    def __init__(self, cfg: DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dims = [cfg.in_channels, *cfg.channels()]
        strides = [2] * cfg.num_layers + [1, 1]
        self.convs = nnx.List([
            PatchConv3d(a, b, cfg.kernel_size, stride=s, rngs=rngs) for a, b, s in zip(dims[:-1], dims[1:], strides)
        ])
        # No norm after the first conv (taming) nor after the logit conv.
        self.norms = nnx.List([
            GroupNorm(c, min(cfg.norm_groups, c), rngs=rngs) if cfg.norm_groups else None for c in dims[2:-1]
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"discriminator: expected video (B, T, H, W, {cfg.in_channels}), got shape {x.shape}")
        if min(cfg.output_shape(*x.shape[1:4])) < 1:
            raise ValueError(f"discriminator: frames of {x.shape[2]}x{x.shape[3]} are too small for {cfg.num_layers} "
                             "strided layers (no patch is left); lower disc_layers")
        x = x.astype(jnp.float32)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i == len(self.convs) - 1:
                break
            if i > 0 and self.norms[i - 1] is not None:
                x = self.norms[i - 1](x)
            x = jax.nn.leaky_relu(x, cfg.negative_slope)
        return x  # (B, T', H', W', 1)
