"""The 3D causal video VAE of Wan 2.1 in Flax NNX, architecture-compatible with diffusers' `AutoencoderKLWan`.

Video (B, T, H, W, 3) in [-1, 1], T = 1 + temporal_factor * k  <->  latents (B, t, h, w, z_dim) with
t = 1 + k, h = H / spatial_factor. The first frame is encoded on its own (an image is a 1-frame video).

Two execution paths compute the same function:
  * full sequence (`encode`, `decode`, `__call__`): one pass over the whole clip; used for training.
  * streaming (`encode_streaming`, `decode_streaming`): the first frame, then `jax.lax.scan` over chunks
    of `temporal_factor` frames (encode) or one latent frame (decode), carrying each causal conv's
    2-frame cache (Wan's CACHE_T = 2). Memory and compile time stay flat in clip length.

Module tree and attribute names follow diffusers (encoder.down_blocks[i].resample / .time_conv, mid_block,
norm_out, conv_out, quant_conv, post_quant_conv, decoder.up_blocks[i].upsamplers[0], ...) so the export
map is mechanical; kernels are channels-last (kt, kh, kw, Cin, Cout).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from klingjax.models.layers.conv3d import CausalConv3d, WanRMSNorm
from klingjax.models.vae_blocks import (
    ACT_AXES,
    Cache,
    ResampleMode,
    WanAttentionBlock,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanUpBlock,
    sub,
)
from klingjax.sharding.rules import shard

_ACT = ACT_AXES
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


# ---------------------------------------------------------------------------------------------------------
# Config and variants
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of the causal VAE; field names follow diffusers' `AutoencoderKLWan` config."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs one entry per downsampling stage "
                f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1})"
            )

    @property
    def spatial_factor(self) -> int:
        """Downsampling factor of height and width."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Downsampling factor of time (after the first frame)."""
        return 2 ** sum(self.temporal_downsample)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latents of a (num_frames, height, width) clip."""
        s = self.spatial_factor
        return 1 + (num_frames - 1) // self.temporal_factor, height // s, width // s


VAE_VARIANTS: dict[str, VAEConfig] = {
    # unit tests: 4x spatial, 4x temporal, 0.16M params
    "tiny": VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True)),
    # trainable on 2 CPU cores (1.84M params): 9x32x32 clips -> 3x8x8x8 latents (4x4x4)
    "demo": VAEConfig(base_dim=16, z_dim=8, dim_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, True)),
    # Wan 2.1 VAE (Wan-AI/Wan2.1-T2V-*-Diffusers/vae, 126.9M params): 4x8x8, 16 latent channels
    "wan2.1": VAEConfig(),
}


def vae_config(variant: str, **overrides) -> VAEConfig:
    """A variant from `VAE_VARIANTS` with fields replaced by `overrides` (lists become tuples)."""
    if variant not in VAE_VARIANTS:
        raise ValueError(f"unknown VAE variant {variant!r}; choose one of {sorted(VAE_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    if unknown := sorted(set(overrides) - fields):
        raise ValueError(f"unknown VAE field(s) {unknown}; valid fields: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(VAE_VARIANTS[variant], **values)


# ---------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------------------


class WanEncoder3d(nnx.Module):
    """Video (B, T, H, W, in_channels) -> (B, t, h, w, z_channels); `down_blocks` is diffusers' flat list."""

    def __init__(self, cfg: VAEConfig, z_channels: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3), padding=(1, 1, 1), **kw)
        layers = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(WanResidualBlock(in_dim, out_dim, dropout=cfg.dropout, **kw))
                if scale in cfg.attn_scales:
                    layers.append(WanAttentionBlock(out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = ResampleMode.DOWNSAMPLE3D if cfg.temporal_downsample[i] else ResampleMode.DOWNSAMPLE2D
                layers.append(WanResample(out_dim, mode, **kw))
                scale /= 2.0
        self.down_blocks = nnx.List(layers)
        self.mid_block = WanMidBlock(dims[-1], dropout=cfg.dropout, num_layers=1, **kw)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=cfg.param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], z_channels, (3, 3, 3), padding=(1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None, *, first: bool) -> tuple[jax.Array, Cache]:
        """Returns (features, new cache); `first` marks a chunk starting at the clip's first frame."""
        x, c_in = self.conv_in(x, sub(cache, "conv_in"))
        x = shard(x, _ACT)
        caches = []
        for i, layer in enumerate(self.down_blocks):
            if isinstance(layer, WanResample):
                x, c = layer(x, sub(sub(cache, "down_blocks"), i), first=first)
            else:
                x, c = layer(x, sub(sub(cache, "down_blocks"), i))
            x = shard(x, _ACT)
            caches.append(c)
        x, c_mid = self.mid_block(x, sub(cache, "mid_block"))
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(shard(x, _ACT))), sub(cache, "conv_out"))
        return x, {"conv_in": c_in, "down_blocks": caches, "mid_block": c_mid, "conv_out": c_out}


class WanDecoder3d(nnx.Module):
    """Latents (B, t, h, w, z_dim) -> video (B, T, H, W, out_channels); upsamplers halve channels (Wan 2.1)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        mults = cfg.dim_mult
        dims = [cfg.base_dim * u for u in (mults[-1], *mults[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3), padding=(1, 1, 1), **kw)
        self.mid_block = WanMidBlock(dims[0], dropout=cfg.dropout, num_layers=1, **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            mode = None
            if i != len(mults) - 1:
                mode = ResampleMode.UPSAMPLE3D if temporal_upsample[i] else ResampleMode.UPSAMPLE2D
            blocks.append(
                WanUpBlock(in_dim, out_dim, cfg.num_res_blocks, dropout=cfg.dropout, upsample_mode=mode, **kw)
            )
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=cfg.param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, (3, 3, 3), padding=(1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None, *, first: bool) -> tuple[jax.Array, Cache]:
        """Returns (video, new cache); `first` marks a chunk starting at the clip's first latent frame."""
        x, c_in = self.conv_in(x, sub(cache, "conv_in"))
        x, c_mid = self.mid_block(shard(x, _ACT), sub(cache, "mid_block"))
        x = shard(x, _ACT)
        caches = []
        for i, block in enumerate(self.up_blocks):
            x, c = block(x, sub(sub(cache, "up_blocks"), i), first=first)
            x = shard(x, _ACT)
            caches.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), sub(cache, "conv_out"))
        return shard(x, _ACT), {"conv_in": c_in, "mid_block": c_mid, "up_blocks": caches, "conv_out": c_out}


# ---------------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------------


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis: (B, ...) -> (B,)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)  # (B, t*h*w*c) -> (B,)


INIT_LOGVAR = -6.0  # posterior std e^-3 ~ 0.05 at init


class CausalVAE(nnx.Module):
    """Wan 2.1 causal video VAE: (B, T, H, W, 3) <-> (B, t, h, w, z_dim), full-sequence and streaming paths."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(padding=(0, 0, 0), dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.cfg = cfg
        self.encoder = WanEncoder3d(cfg, 2 * cfg.z_dim, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
        # Start from a nearly deterministic posterior: with logvar ~ 0 the sampled latents are unit noise,
        # the decoder first learns to ignore them, and reconstructions stay blank for hundreds of steps.
        bias = self.quant_conv.bias[...]
        self.quant_conv.bias[...] = bias.at[cfg.z_dim:].set(INIT_LOGVAR)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = WanDecoder3d(cfg, rngs=rngs)

    # -- input checks (shapes are static, so these cost nothing under jit) --

    def _check_video(self, x: jax.Array) -> None:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected video (B, T, H, W, {cfg.in_channels}), got shape {x.shape}")
        _, t, h, w, _ = x.shape
        if t < 1 or (t - 1) % cfg.temporal_factor:
            raise ValueError(
                f"frame count {t} is not 1 + {cfg.temporal_factor} * k; use e.g. "
                f"{1 + (max(t, 1) - 1) // cfg.temporal_factor * cfg.temporal_factor} frames"
            )
        if h % cfg.spatial_factor or w % cfg.spatial_factor:
            raise ValueError(f"height {h} and width {w} must be divisible by the spatial factor {cfg.spatial_factor}")

    def _check_latents(self, z: jax.Array) -> None:
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"expected latents (B, t, h, w, {self.cfg.z_dim}), got shape {z.shape}")

    def _check_inference(self) -> None:
        # Dropout would have to mutate its RNG inside the scan; streaming is for inference only.
        if self.cfg.dropout > 0 and any(
            isinstance(m, nnx.Dropout) and not m.deterministic for _, m in nnx.iter_graph(self)
        ):
            raise ValueError(f"streaming encode/decode with dropout={self.cfg.dropout}: call model.eval() first")

    def _moments(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        h, _ = self.quant_conv(h)  # (B, t, h, w, 2z)
        mean, logvar = jnp.split(h, 2, axis=-1)  # each (B, t, h, w, z)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    # -- full-sequence path --

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video (B, T, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, t, h, w, z_dim)."""
        self._check_video(x)
        h, _ = self.encoder(shard(x, _ACT), first=True)  # (B, t, h, w, 2z)
        return self._moments(h)

    def decode(self, z: jax.Array, *, clip: bool = True) -> jax.Array:
        """Latents (B, t, h, w, z_dim) -> video (B, 1 + tf*(t-1), H, W, 3), clipped to [-1, 1] as diffusers."""
        self._check_latents(z)
        x, _ = self.post_quant_conv(shard(z, _ACT))
        x, _ = self.decoder(x, first=True)
        return jnp.clip(x, -1.0, 1.0) if clip else x

    def __call__(self, x: jax.Array, *, rngs_or_key: nnx.Rngs | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Train path: (recon (unclipped), mean, logvar) with z = mean + exp(logvar / 2) * eps."""
        key = rngs_or_key() if isinstance(rngs_or_key, nnx.Rngs) else rngs_or_key
        mean, logvar = self.encode(x)
        # Drawn flat: XLA:CPU compiles threefry for rank-5 shapes very slowly.
        eps = jax.random.normal(key, (mean.size,), mean.dtype).reshape(mean.shape)  # (B*t*h*w*z,) -> (B, t, h, w, z)
        z = mean + jnp.exp(0.5 * logvar) * eps
        return self.decode(z, clip=False), mean, logvar

    # -- streaming path --

    def encode_streaming(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """As `encode`, but frame 0 then a scan over chunks of `temporal_factor` frames with a frame cache.

        The posterior is written chunk by chunk into preallocated (mean, logvar) buffers carried by the scan
        (updated in place), so working memory does not grow with clip length; see `decode_streaming`.
        """
        self._check_video(x)
        self._check_inference()
        b, t = x.shape[:2]
        tf = self.cfg.temporal_factor
        h0, cache = self.encoder(shard(x[:, :1], _ACT), first=True)  # (B, 1, h, w, 2z)
        mean0, logvar0 = self._moments(h0)  # each (B, 1, h, w, z)
        if t == 1:
            return mean0, logvar0
        n = (t - 1) // tf
        buffers = [jnp.zeros((b, 1 + n, *m.shape[2:]), m.dtype).at[:, :1].set(m) for m in (mean0, logvar0)]

        def step(carry, i):
            cache, mean, logvar = carry
            chunk = jax.lax.dynamic_slice_in_dim(x, 1 + tf * i, tf, axis=1)  # (B, tf, H, W, C)
            h, cache = self.encoder(shard(chunk, _ACT), cache, first=False)  # (B, 1, h, w, 2z)
            m, lv = self._moments(h)  # each (B, 1, h, w, z)
            mean = jax.lax.dynamic_update_slice_in_dim(mean, m, 1 + i, axis=1)
            logvar = jax.lax.dynamic_update_slice_in_dim(logvar, lv, 1 + i, axis=1)
            return (cache, mean, logvar), None

        (_, mean, logvar), _ = jax.lax.scan(step, (cache, *buffers), jnp.arange(n))
        return mean, logvar

    def decode_streaming(self, z: jax.Array, *, clip: bool = True) -> jax.Array:
        """As `decode`, but one latent frame at a time (a scan after frame 0) with a frame cache.

        Each step writes its `temporal_factor` frames into a preallocated output video carried by the scan
        (`dynamic_update_slice`, done in place by XLA), so no stacked per-step outputs, transposes or
        concatenations exist: the compiled program's temp memory is the same for any clip length, and only the
        output video itself grows. For videos too long for the device, `vae_tiling.decode_to_host` runs the
        same per-chunk step from a host loop and copies frames out as they are made.
        """
        self._check_latents(z)
        self._check_inference()
        b, t = z.shape[:2]
        tf = self.cfg.temporal_factor
        finish = (lambda v: jnp.clip(v, -1.0, 1.0)) if clip else (lambda v: v)
        x0, cache = self.decode_chunk(z[:, :1], None)  # (B, 1, H, W, 3)
        if t == 1:
            return finish(x0)
        out = jnp.zeros((b, 1 + tf * (t - 1), *x0.shape[2:]), x0.dtype).at[:, :1].set(finish(x0))

        def step(carry, i):
            cache, out = carry
            x, cache = self.decode_chunk(jax.lax.dynamic_slice_in_dim(z, i, 1, axis=1), cache)  # (B, tf, H, W, 3)
            out = jax.lax.dynamic_update_slice_in_dim(out, finish(x), 1 + tf * (i - 1), axis=1)
            return (cache, out), None

        (_, out), _ = jax.lax.scan(step, (cache, out), jnp.arange(1, t))
        return out

    def decode_chunk(self, z: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """One streaming step: latent frames (B, n, h, w, z) -> (unclipped video, new cache).

        `cache=None` starts a clip (frame 0 -> 1 video frame, later latent frames -> `temporal_factor` each).
        """
        x, _ = self.post_quant_conv(shard(z, _ACT))  # (B, n, h, w, z)
        return self.decoder(x, cache, first=cache is None)

    def encode_chunk(self, x: jax.Array, cache: Cache) -> tuple[tuple[jax.Array, jax.Array], Cache]:
        """One streaming step: video frames (B, T, H, W, 3) -> ((mean, logvar) of its latent frames, new cache).

        `cache=None` starts a clip (T = 1 + tf * k); later chunks take T = tf * k frames.
        """
        h, cache = self.encoder(shard(x, _ACT), cache, first=cache is None)  # (B, t, h, w, 2z)
        return self._moments(h), cache
