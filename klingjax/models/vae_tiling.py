"""Spatially tiled and host-streamed encode/decode for long, high-resolution video (minutes of 1080p) with the VAE.

Tiling: a frame is cut into equal, overlapping tiles; overlapping outputs are blended with linear ramps, a
weighted average whose weights rise from ~0 to 1 across each interior overlap and stay 1 at the frame border
(diffusers' `AutoencoderKLWan.tiled_encode/tiled_decode` idea as one normalised weighted sum; the last row/column
of tiles is shifted back to end at the border). The weights are separable, so they are pre-normalised per axis.

Streaming: time is processed one chunk at a time (1 latent frame <-> `temporal_factor` video frames) and every
tile keeps its own causal frame cache. For each chunk, every tile is cropped, run through `CausalVAE.decode_chunk`
/ `encode_chunk` with its cache, and added with its weight into the chunk's output; so device memory is one
tile's activations + all tiles' caches + one chunk, whatever the clip length.

    video = decode_tiled(vae, latents, tile=(32, 32), overlap=(8, 8))     # in jit; tile sizes in latent pixels
    mean, logvar = encode_tiled(vae, video, tile=(256, 256), overlap=(64, 64))                 # pixels
    frames = decode_to_host(vae, latents, tile=(32, 32), out=np.empty(shape, np.uint8))    # host loop, any length
    mean, logvar = encode_from_host(vae, frames_uint8, tile=(256, 256))

`decode_tiled` / `encode_tiled` are traceable: the whole clip is one program (a scan over chunks, each a scan
over tiles with the caches stacked); memory is flat in length except the output. `decode_to_host` /
`encode_from_host` drive one jitted one-tile program (cache and chunk output donated, each tile's cache its own
buffer, so nothing is copied) from a Python loop, and copy each chunk's frames into a host array (a `np.memmap`
works): nothing on the device grows with length. `decode_step_memory` gives that footprint without running it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.models.vae import CausalVAE
from klingjax.models.vae_blocks import Cache


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


def _axis_weights(starts: tuple[int, ...], tile: int, size: int, ramp: int) -> np.ndarray:
    """Per-tile 1-D weights (n, tile) along one axis, normalised so the placed weights sum to 1 everywhere."""
    ws = [_ramp(tile, ramp, lo_edge=s == 0, hi_edge=s + tile == size) for s in starts]
    total = np.zeros(size, np.float64)
    for s, w in zip(starts, ws):
        total[s:s + tile] += w
    return np.stack([w / total[s:s + tile] for s, w in zip(starts, ws)]).astype(np.float32)  # (n, tile)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile placement: input crops (th, tw) at (ys[i], xs[j]) become output tiles (oth, otw) at (oys[i], oxs[j])."""

    ys: tuple[int, ...]
    xs: tuple[int, ...]
    th: int
    tw: int
    oys: tuple[int, ...]
    oxs: tuple[int, ...]
    oth: int
    otw: int
    out_hw: tuple[int, int]
    ramp: tuple[int, int]  # blend ramp lengths in output pixels

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalised separable blend weights: rows (len(ys), oth) and columns (len(xs), otw)."""
        return (_axis_weights(self.oys, self.oth, self.out_hw[0], self.ramp[0]),
                _axis_weights(self.oxs, self.otw, self.out_hw[1], self.ramp[1]))


def _grid(hw: tuple[int, int], tile, overlap, up: int, down: int, name: str) -> TileGrid:
    """Grid over an input of size `hw`; output coordinates are input * up // down. `tile=None`: one tile."""
    if tile is None:
        tile, overlap = hw, (0, 0)
    for v, o in zip(tile, overlap):
        if v % down or o % down:
            raise ValueError(f"{name}: tile {tuple(tile)} and overlap {tuple(overlap)} must be multiples of {down}")
    th, tw = min(tile[0], hw[0]), min(tile[1], hw[1])
    ys, xs = tuple(tile_starts(hw[0], th, overlap[0])), tuple(tile_starts(hw[1], tw, overlap[1]))
    o = lambda v: v * up // down  # noqa: E731
    return TileGrid(ys, xs, th, tw, tuple(map(o, ys)), tuple(map(o, xs)), o(th), o(tw), (o(hw[0]), o(hw[1])),
                    (o(overlap[0]), o(overlap[1])))


# ---------------------------------------------------------------------------------------------------------
# One chunk, all tiles
# ---------------------------------------------------------------------------------------------------------


def _crop(x: jax.Array, grid: TileGrid, k) -> jax.Array:
    """Input tile k (traced or static) of a chunk x (B, T, H, W, C) -> (B, T, th, tw, C)."""
    ncol = len(grid.xs)
    y0, x0 = jnp.asarray(grid.ys)[k // ncol], jnp.asarray(grid.xs)[k % ncol]
    return jax.lax.dynamic_slice(x, (0, 0, y0, x0, 0), (x.shape[0], x.shape[1], grid.th, grid.tw, x.shape[-1]))


def _add(out: jax.Array, y: jax.Array, grid: TileGrid, k) -> jax.Array:
    """out (B, T', oH, oW, C') float32 plus output tile k (B, T', oth, otw, C') times its blend weight."""
    ncol = len(grid.xs)
    wy, wx = (jnp.asarray(w) for w in grid.weights())  # (R, oth), (C, otw)
    r, q = k // ncol, k % ncol
    weight = wy[r][:, None, None] * wx[q][None, :, None]  # (oth, otw, 1)
    start = (0, 0, jnp.asarray(grid.oys)[r], jnp.asarray(grid.oxs)[q], 0)
    region = jax.lax.dynamic_slice(out, start, y.shape)  # (B, T', oth, otw, C')
    return jax.lax.dynamic_update_slice(out, region + y.astype(jnp.float32) * weight, start)


def _run_tiles(fn, x: jax.Array, caches: Cache, grid: TileGrid) -> tuple[jax.Array, Cache]:
    """Scan `fn(crop, cache) -> (y, cache)` over the tiles of one chunk x (B, T, H, W, C); blend the y's.

    `caches` are stacked over tiles (N, ...), or None at the clip start (then they are created and stacked).
    Returns (blended (B, T', oH, oW, C'), new stacked caches).
    """
    take = lambda tree, k: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, 0, False), tree)  # noqa: E731
    y_shape = jax.eval_shape(lambda t: fn(t, None if caches is None else take(caches, 0))[0], _crop(x, grid, 0))
    out = jnp.zeros((x.shape[0], y_shape.shape[1], *grid.out_hw, y_shape.shape[-1]), jnp.float32)

    if caches is None:
        def first(out, k):
            y, cache = fn(_crop(x, grid, k), None)
            return _add(out, y, grid, k), cache

        out, caches = jax.lax.scan(first, out, jnp.arange(grid.num_tiles))  # caches stacked (N, ...)
    else:
        def step(carry, k):
            out, caches = carry
            y, cache = fn(_crop(x, grid, k), take(caches, k))
            caches = jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, k, 0), caches, cache)
            return (_add(out, y, grid, k), caches), None

        (out, caches), _ = jax.lax.scan(step, (out, caches), jnp.arange(grid.num_tiles))
    return out.astype(y_shape.dtype), caches


def _decode_fn(vae: CausalVAE):
    return lambda z, cache: vae.decode_chunk(z, cache)  # (B, n, th, tw, z) -> (B, T', th*s, tw*s, 3)


def _encode_fn(vae: CausalVAE):
    def fn(x, cache):
        (mean, logvar), cache = vae.encode_chunk(x, cache)
        return jnp.concatenate([mean, logvar], axis=-1), cache  # (B, t, th/s, tw/s, 2z)

    return fn


def _decode_grid(vae: CausalVAE, z_shape, tile, overlap) -> TileGrid:
    return _grid(z_shape[2:4], tile, overlap, vae.cfg.spatial_factor, 1, "decode")


def _encode_grid(vae: CausalVAE, x_shape, tile, overlap) -> TileGrid:
    return _grid(x_shape[2:4], tile, overlap, 1, vae.cfg.spatial_factor, "encode")


# ---------------------------------------------------------------------------------------------------------
# Traceable (whole clip in one program)
# ---------------------------------------------------------------------------------------------------------


def _scan_chunks(fn, x: jax.Array, grid: TileGrid, per_chunk: int, out_per_chunk: int) -> jax.Array:
    """Chunk 0 (1 frame), then a scan over chunks of `per_chunk` frames writing into a preallocated output."""
    n = (x.shape[1] - 1) // per_chunk
    y0, caches = _run_tiles(fn, x[:, :1], None, grid)  # (B, 1, oH, oW, C')
    if n == 0:
        return y0
    out = jnp.zeros((y0.shape[0], 1 + out_per_chunk * n, *y0.shape[2:]), y0.dtype).at[:, :1].set(y0)

    def step(carry, i):
        caches, out = carry
        chunk = jax.lax.dynamic_slice_in_dim(x, 1 + per_chunk * i, per_chunk, axis=1)
        y, caches = _run_tiles(fn, chunk, caches, grid)
        return (caches, jax.lax.dynamic_update_slice_in_dim(out, y, 1 + out_per_chunk * i, axis=1)), None

    (_, out), _ = jax.lax.scan(step, (caches, out), jnp.arange(n))
    return out


def encode_tiled(vae: CausalVAE, video: jax.Array, *, tile: tuple[int, int] = (256, 256),
                 overlap: tuple[int, int] = (64, 64)) -> tuple[jax.Array, jax.Array]:
    """Video (B, T, H, W, 3) -> posterior (mean, logvar) (B, t, h, w, z), tiles of `tile` pixels blended."""
    vae._check_video(video)
    vae._check_inference()
    grid = _encode_grid(vae, video.shape, tile, overlap)
    moments = _scan_chunks(_encode_fn(vae), video, grid, vae.cfg.temporal_factor, 1)  # (B, t, h, w, 2z)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, logvar


def decode_tiled(vae: CausalVAE, z: jax.Array, *, tile: tuple[int, int] = (32, 32),
                 overlap: tuple[int, int] = (8, 8), clip: bool = True) -> jax.Array:
    """Latents (B, t, h, w, z) -> video (B, T, H, W, 3); `tile`/`overlap` in latent pixels."""
    vae._check_latents(z)
    vae._check_inference()
    grid = _decode_grid(vae, z.shape, tile, overlap)
    out = _scan_chunks(_decode_fn(vae), z, grid, 1, vae.cfg.temporal_factor)
    return jnp.clip(out, -1.0, 1.0) if clip else out


# ---------------------------------------------------------------------------------------------------------
# Host-driven (any length): one jitted step per chunk, cache donated, frames copied to host
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _programs(graphdef, kind: str, grid: TileGrid):
    """(start, step) jitted one-tile programs of `kind` ("encode" | "decode") for one model structure and grid.

    start(state, chunk, out, k) -> (out, cache_k); step(state, chunk, cache_k, out, k) -> (out, cache_k): crop tile
    k (a traced index: one compile for every tile) of the chunk, run it, add it blended into `out`. `out` and the
    cache are donated, so both update in place; each tile's cache stays a separate device buffer.
    """
    make = _encode_fn if kind == "encode" else _decode_fn

    def step(state, x, cache, out, k):
        y, cache = make(nnx.merge(graphdef, state))(_crop(x, grid, k), cache)
        return _add(out, y, grid, k), cache

    start = jax.jit(lambda state, x, out, k: step(state, x, None, out, k), donate_argnums=2)
    return start, jax.jit(step, donate_argnums=(2, 3))


def _stream(vae: CausalVAE, kind: str, x, grid: TileGrid, per_chunk: int, out_frames: tuple[int, int],
            channels: int, prepare, write) -> None:
    """Chunk 0 (1 frame), then every `per_chunk`-frame chunk of host array x, tile by tile; `write(i, y)` gets chunk
    i's blended float32 output (B, out_frames[i > 0], oH, oW, channels) while the device runs chunk i + 1."""
    graphdef, state = nnx.split(vae)
    start, step = _programs(graphdef, kind, grid)
    caches: list[Cache] = [None] * grid.num_tiles
    pending = None
    for i in range(1 + (x.shape[1] - 1) // per_chunk):
        chunk = prepare(x[:, :1] if i == 0 else x[:, 1 + per_chunk * (i - 1): 1 + per_chunk * i])
        out = jnp.zeros((x.shape[0], out_frames[i > 0], *grid.out_hw, channels), jnp.float32)
        for k in range(grid.num_tiles):
            if i == 0:
                out, caches[k] = start(state, chunk, out, k)
            else:
                out, caches[k] = step(state, chunk, caches[k], out, k)
        if pending is not None:
            write(*pending)  # copies chunk i - 1 to the host while chunk i runs
        pending = (i, out)
    write(*pending)


def decode_step_memory(vae: CausalVAE, latent_shape: tuple[int, int, int, int], *, tile: tuple[int, int] | None = None,
                       overlap: tuple[int, int] = (8, 8)) -> dict[str, int]:
    """Device bytes of `decode_to_host` for latents (B, h, w, z), the same for any length: params, all tiles' caches,
    chunk outputs (two live at once: one is being copied to the host), the one-tile program's temp, and `total`."""
    b, h, w, c = latent_shape
    zi = jax.ShapeDtypeStruct((b, 1, h, w, c), jnp.float32)
    grid = _decode_grid(vae, zi.shape, tile, overlap)
    graphdef, state = nnx.split(vae)
    start, step = _programs(graphdef, "decode", grid)
    out = jax.ShapeDtypeStruct((b, vae.cfg.temporal_factor, *grid.out_hw, vae.cfg.out_channels), jnp.float32)
    cache = jax.eval_shape(start, state, zi, out, 0)[1]
    stats = step.lower(state, zi, cache, out, 0).compile().memory_analysis()
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    mem = {"params": nbytes(state), "caches": grid.num_tiles * nbytes(cache), "chunk_out": 2 * nbytes(out),
           "temp": stats.temp_size_in_bytes}
    mem["total"] = sum(mem.values()) + nbytes(zi)
    return mem


def decode_to_host(vae: CausalVAE, z, *, tile: tuple[int, int] | None = None, overlap: tuple[int, int] = (8, 8),
                   clip: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Latents (B, t, h, w, z) -> host video (B, T, H, W, 3), one latent frame per jitted step (tiled if `tile`).

    `out` (optional, e.g. a `np.memmap`): float32 receives values in [-1, 1], uint8 receives [0, 255].
    """
    vae._check_latents(z)
    vae._check_inference()
    b, t, h, w, _ = z.shape
    tf, s = vae.cfg.temporal_factor, vae.cfg.spatial_factor
    shape = (b, 1 + tf * (t - 1), h * s, w * s, vae.cfg.out_channels)
    if out is None:
        out = np.empty(shape, np.float32)
    if out.shape != shape or out.dtype not in (np.float32, np.uint8):
        raise ValueError(f"decode_to_host: out must be float32 or uint8 of shape {shape}, got {out.dtype} {out.shape}")

    def write(i, y):
        y = np.asarray(y)  # (B, n, H, W, 3)
        if clip or out.dtype == np.uint8:
            y = np.clip(y, -1.0, 1.0)
        if out.dtype == np.uint8:
            y = np.round((y + 1.0) * 127.5)
        lo = 0 if i == 0 else 1 + tf * (i - 1)
        out[:, lo:lo + y.shape[1]] = y

    _stream(vae, "decode", z, _decode_grid(vae, z.shape, tile, overlap), 1, (1, tf), shape[-1], jnp.asarray, write)
    return out


def encode_from_host(vae: CausalVAE, video, *, tile: tuple[int, int] | None = None,
                     overlap: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Host video (B, T, H, W, 3), float in [-1, 1] or uint8 -> host (mean, logvar) (B, t, h, w, z), chunk by chunk."""
    vae._check_video(video)
    vae._check_inference()
    grid = _encode_grid(vae, video.shape, tile, overlap)
    b, t = video.shape[:2]
    tf = vae.cfg.temporal_factor
    moments = np.empty((b, 1 + (t - 1) // tf, *grid.out_hw, 2 * vae.cfg.z_dim), np.float32)

    def prepare(chunk):
        chunk = np.asarray(chunk)
        return jnp.asarray(chunk, jnp.float32) / 127.5 - 1.0 if chunk.dtype == np.uint8 else jnp.asarray(chunk)

    def write(i, y):
        moments[:, i:i + 1] = np.asarray(y)

    _stream(vae, "encode", video, grid, tf, (1, 1), 2 * vae.cfg.z_dim, prepare, write)
    return moments[..., :vae.cfg.z_dim], moments[..., vae.cfg.z_dim:]
