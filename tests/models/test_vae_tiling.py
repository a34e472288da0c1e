"""Spatially tiled VAE encode/decode (klingjax/models/vae_tiling.py) on the tiny variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.vae import VAE_VARIANTS, CausalVAE
from klingjax.models.vae_tiling import _blend, decode_tiled, encode_tiled, tile_starts

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


def test_blend_of_exact_crops_is_identity():
    img = jax.random.normal(jax.random.key(0), (2, 3, 20, 28, 4))
    ys, xs = tile_starts(20, 8, 3), tile_starts(28, 12, 4)
    tiles = jnp.stack([img[:, :, y:y + 8, x:x + 12] for y in ys for x in xs])
    np.testing.assert_allclose(_blend(tiles, ys, xs, (20, 28), 1, (3, 4)), img, rtol=1e-6, atol=1e-6)


def test_one_tile_equals_streaming(model):
    z = jax.random.normal(jax.random.key(1), (1, 2, 4, 4, CFG.z_dim))
    fn, state = _run(model, lambda m, z: (decode_tiled(m, z, tile=(8, 8), overlap=(2, 2)), m.decode_streaming(z)))
    tiled, streamed = fn(state, z)
    np.testing.assert_allclose(tiled, streamed, rtol=1e-6, atol=1e-6)


def test_tiled_shapes(model):
    x = jax.random.uniform(jax.random.key(2), (1, 1, 24, 32, 3), minval=-1, maxval=1)

    def both(m, x):
        mean, logvar = encode_tiled(m, x, tile=(16, 16), overlap=(8, 8))
        return mean, logvar, decode_tiled(m, mean, tile=(4, 4), overlap=(2, 2))

    fn, state = _run(model, both)
    mean, logvar, video = fn(state, x)
    assert mean.shape == logvar.shape == (1, 1, 6, 8, CFG.z_dim)
    assert video.shape == x.shape and np.all(np.isfinite(video))


def test_bad_tiles_raise(model):
    x = jnp.zeros((1, 1, 16, 16, 3))
    with pytest.raises(ValueError, match="multiples of 4"):
        encode_tiled(model, x, tile=(10, 10), overlap=(2, 2))
    with pytest.raises(ValueError, match="divisible by the spatial factor"):
        encode_tiled(model, jnp.zeros((1, 1, 18, 16, 3)), tile=(8, 8), overlap=(4, 4))
