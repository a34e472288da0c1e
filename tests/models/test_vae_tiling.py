"""Spatially tiled and host-streamed VAE encode/decode (klingjax/models/vae_tiling.py) on the tiny variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.vae import VAE_VARIANTS, CausalVAE
from klingjax.models.vae_tiling import (
    _grid,
    _run_tiles,
    decode_tiled,
    decode_to_host,
    encode_from_host,
    encode_tiled,
    tile_starts,
)

CFG = VAE_VARIANTS["tiny"]
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def model() -> CausalVAE:
    return CausalVAE(CFG, rngs=nnx.Rngs(0))


def _run(model, fn):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a), compiler_options=_FAST_COMPILE), state


def test_tile_starts_cover_with_overlap():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(20, 8, 2) == [0, 6, 12]  # the last tile is shifted back to end at the border
    for size, tile, overlap in [(20, 8, 2), (37, 8, 3), (64, 16, 8)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(20, 8, 8)


@pytest.mark.parametrize("up", [1, 2])
def test_tile_scan_of_exact_crops_is_identity(up):
    """Cropping, placement and the normalised ramps reassemble a frame exactly (also at 2x output scale)."""
    img = jax.random.normal(jax.random.key(0), (2, 3, 20, 28, 4))
    grid = _grid((20, 28), (8, 12), (3, 4), up, 1, "test")
    assert grid.num_tiles == 4 * 3 and grid.out_hw == (20 * up, 28 * up)
    upsample = lambda x: jnp.repeat(jnp.repeat(x, up, axis=2), up, axis=3)  # noqa: E731
    out, caches = _run_tiles(lambda crop, cache: (upsample(crop), cache), img, None, grid)
    np.testing.assert_allclose(out, upsample(img), rtol=1e-5, atol=1e-5)
    assert caches is None


def test_decode_to_host_equals_full_decode(model):
    """Host-streamed decode (one latent frame per jitted step, frames copied out) == the full-sequence decode."""
    z = jax.random.normal(jax.random.key(2), (1, 3, 6, 4, CFG.z_dim))
    fn, state = _run(model, lambda m, z: m.decode(z, clip=False))
    full = fn(state, z)
    host = decode_to_host(model, np.asarray(z), clip=False)
    assert host.shape == (1, 9, 24, 16, 3) and host.dtype == np.float32
    np.testing.assert_allclose(host, full, rtol=1e-5, atol=1e-5)
    frames = decode_to_host(model, np.asarray(z), out=np.zeros(host.shape, np.uint8))
    np.testing.assert_array_equal(frames, np.round((np.clip(host, -1, 1) + 1) * 127.5).astype(np.uint8))
    with pytest.raises(ValueError, match="out must be float32 or uint8 of shape"):
        decode_to_host(model, np.asarray(z), out=np.zeros((1, 8, 24, 16, 3), np.float32))


@pytest.mark.slow
def test_tiled_decode_to_host_equals_tiled_in_jit(model):
    """Streaming + tiling from the host loop (per-tile caches) == the traceable `decode_tiled` (3x2 tiles)."""
    z = jax.random.normal(jax.random.key(2), (1, 3, 6, 4, CFG.z_dim))
    fn, state = _run(model, lambda m, z: (decode_tiled(m, z, tile=(4, 2), overlap=(2, 0), clip=False),
                                          m.decode_streaming(z, clip=False)))
    tiled, streamed = fn(state, z)
    host_tiled = decode_to_host(model, np.asarray(z), tile=(4, 2), overlap=(2, 0), clip=False)
    np.testing.assert_allclose(host_tiled, tiled, rtol=1e-5, atol=1e-5)
    assert float(np.abs(host_tiled - streamed).max()) > 1e-3  # the tiles really are smaller than the frame


def test_encode_from_host_equals_full_encode(model):
    x = jax.random.uniform(jax.random.key(3), (1, 9, 16, 8, 3), minval=-1, maxval=1)
    fn, state = _run(model, lambda m, x: m.encode(x))
    mean, logvar = fn(state, x)
    host_mean, host_logvar = encode_from_host(model, np.asarray(x))
    np.testing.assert_allclose(host_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host_logvar, logvar, rtol=1e-5, atol=1e-5)
    u8 = np.round((np.asarray(x) + 1) * 127.5).astype(np.uint8)  # uint8 input is scaled to [-1, 1] on the device
    np.testing.assert_allclose(encode_from_host(model, u8)[0], fn(state, jnp.asarray(u8 / 127.5 - 1.0))[0],
                               rtol=1e-4, atol=1e-4)


def test_tiled_shapes(model):
    x = jax.random.uniform(jax.random.key(2), (1, 5, 24, 32, 3), minval=-1, maxval=1)

    def both(m, x):
        mean, logvar = encode_tiled(m, x, tile=(16, 16), overlap=(8, 8))
        return mean, logvar, decode_tiled(m, mean, tile=(4, 4), overlap=(2, 2))

    fn, state = _run(model, both)
    mean, logvar, video = fn(state, x)
    assert mean.shape == logvar.shape == (1, 2, 6, 8, CFG.z_dim)
    assert video.shape == x.shape and np.all(np.isfinite(video))


def test_bad_tiles_raise(model):
    x = jnp.zeros((1, 1, 16, 16, 3))
    with pytest.raises(ValueError, match="multiples of 4"):
        encode_tiled(model, x, tile=(10, 10), overlap=(2, 2))
    with pytest.raises(ValueError, match="divisible by the spatial factor"):
        encode_tiled(model, jnp.zeros((1, 1, 18, 16, 3)), tile=(8, 8), overlap=(4, 4))
    with pytest.raises(ValueError, match="overlap < tile"):
        decode_to_host(model, np.zeros((1, 2, 4, 4, CFG.z_dim), np.float32), tile=(2, 2), overlap=(2, 2))
