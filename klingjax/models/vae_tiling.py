"""Spatially tiled encode/decode for high-resolution video (1080p, 4K) with the causal VAE.

A frame is cut into equal, overlapping tiles; each tile goes through the VAE's streaming path (so memory is
flat in clip length too), and overlapping outputs are blended with linear ramps: a weighted average whose
weights rise from ~0 to 1 across each interior overlap and stay 1 at the frame border. This is diffusers'
`AutoencoderKLWan.tiled_encode/tiled_decode` idea written as one normalised weighted sum, so it also handles
the last row/column of tiles, which is shifted back to end at the border (a larger overlap there).

All tiles have one shape, so they run through `jax.lax.map` (one compiled tile program whatever the frame
size); the blend is a static Python loop of `.at[].add` over tile positions.

    mean, logvar = encode_tiled(vae, video, tile=(256, 256), overlap=(64, 64))     # pixels
    video = decode_tiled(vae, latents, tile=(32, 32), overlap=(8, 8))              # latent pixels
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from klingjax.models.vae import CausalVAE


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles of length `tile` covering [0, size) with at least `overlap` overlap."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, ramp: int, *, lo_edge: bool, hi_edge: bool) -> np.ndarray:
    """1-D blend weights (length,): linear ramps of `ramp` samples on interior edges, 1 on frame borders."""
    w = np.ones(length, np.float32)
    if ramp > 0:
        up = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp  # (ramp,) in (0, 1)
        if not lo_edge:
            w[:ramp] = np.minimum(w[:ramp], up)
        if not hi_edge:
            w[-ramp:] = np.minimum(w[-ramp:], up[::-1])
    return w


def _blend(tiles: jax.Array, ys: list[int], xs: list[int], out_hw: tuple[int, int], scale: int,
           overlap: tuple[int, int]) -> jax.Array:
    """Weighted sum of tiles (N, B, T, th, tw, C) placed at (ys[i], xs[j]) * scale -> (B, T, H, W, C)."""
    n, b, t, th, tw, c = tiles.shape
    h, w = out_hw
    out = jnp.zeros((b, t, h, w, c), jnp.float32)
    norm = np.zeros((h, w), np.float32)
    ramp_h, ramp_w = overlap[0] * scale, overlap[1] * scale
    k = 0
    for y in ys:
        for x in xs:
            wy = _ramp(th, ramp_h, lo_edge=y == 0, hi_edge=y * scale + th == h)
            wx = _ramp(tw, ramp_w, lo_edge=x == 0, hi_edge=x * scale + tw == w)
            weight = wy[:, None] * wx[None, :]  # (th, tw)
            y0, x0 = y * scale, x * scale
            out = out.at[:, :, y0:y0 + th, x0:x0 + tw].add(tiles[k].astype(jnp.float32) * weight[:, :, None])
            norm[y0:y0 + th, x0:x0 + tw] += weight
            k += 1
    return (out / norm[:, :, None]).astype(tiles.dtype)


def _check_tile(name: str, tile: tuple[int, int], overlap: tuple[int, int], factor: int) -> None:
    for v, o in zip(tile, overlap):
        if v % factor or o % factor:
            raise ValueError(f"{name}: tile {tile} and overlap {overlap} must be multiples of {factor}")


def encode_tiled(vae: CausalVAE, video: jax.Array, *, tile: tuple[int, int] = (256, 256),
                 overlap: tuple[int, int] = (64, 64)) -> tuple[jax.Array, jax.Array]:
    """Video (B, T, H, W, 3) -> posterior (mean, logvar) (B, t, h, w, z), tiles of `tile` pixels blended."""
    vae._check_video(video)
    s = vae.cfg.spatial_factor
    _check_tile("encode_tiled", tile, overlap, s)
    _, _, hh, ww, _ = video.shape
    th, tw = min(tile[0], hh), min(tile[1], ww)
    ys, xs = tile_starts(hh, th, overlap[0]), tile_starts(ww, tw, overlap[1])
    crops = jnp.stack([video[:, :, y:y + th, x:x + tw] for y in ys for x in xs])  # (N, B, T, th, tw, 3)
    moments = jax.lax.map(lambda v: jnp.concatenate(vae.encode_streaming(v), -1), crops)  # (N, B, t, th/s, tw/s, 2z)
    blended = _blend(moments, [y // s for y in ys], [x // s for x in xs], (hh // s, ww // s), 1,
                     (overlap[0] // s, overlap[1] // s))
    mean, logvar = jnp.split(blended, 2, axis=-1)
    return mean, logvar


def decode_tiled(vae: CausalVAE, z: jax.Array, *, tile: tuple[int, int] = (32, 32),
                 overlap: tuple[int, int] = (8, 8), clip: bool = True) -> jax.Array:
    """Latents (B, t, h, w, z) -> video (B, T, H, W, 3); `tile`/`overlap` in latent pixels."""
    s = vae.cfg.spatial_factor
    _, _, h, w, _ = z.shape
    th, tw = min(tile[0], h), min(tile[1], w)
    ys, xs = tile_starts(h, th, overlap[0]), tile_starts(w, tw, overlap[1])
    crops = jnp.stack([z[:, :, y:y + th, x:x + tw] for y in ys for x in xs])  # (N, B, t, th, tw, z)
    videos = jax.lax.map(lambda zi: vae.decode_streaming(zi, clip=False), crops)  # (N, B, T, th*s, tw*s, 3)
    out = _blend(videos, ys, xs, (h * s, w * s), s, overlap)
    return jnp.clip(out, -1.0, 1.0) if clip else out
