"""Unit tests for the DiT layers: RoPE (grid and per-token positions), norms, embeddings, patchify, attention
masking (per key and per query)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klingjax.models.layers.attention import AttentionImpl, WanAttention, attention
from klingjax.models.layers.embeddings import PatchEmbed, patchify, timestep_embedding, unpatchify
from klingjax.models.layers.norms import LayerNorm, RMSNorm
from klingjax.models.layers.rope import apply_rope, grid_positions, rope_3d, rope_axis_dims, rope_from_positions

# Tests jit whole computations (eager op-by-op dispatch compiles every op) at low XLA opt level: fast compiles.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def test_rope_axis_dims_match_wan_split():
    assert rope_axis_dims(128) == (44, 42, 42)  # Wan 1.3B / 14B heads
    assert rope_axis_dims(32) == (12, 10, 10)
    assert sum(rope_axis_dims(64)) == 64


def test_rope_matches_complex_rotation():
    """Each channel pair is multiplied by exp(i * pos * theta^(-2j/d_part)) for its axis position."""
    grid, k, theta = (2, 3, 4), 32, 10000.0
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, math.prod(grid), 2, k)))
    got = np.asarray(fast_jit(lambda x: apply_rope(x, *rope_3d(grid, k, theta)))(jnp.asarray(x)))

    dims = rope_axis_dims(k)
    pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)  # (N, 3)
    angles = np.concatenate(
        [np.outer(pos[:, a], theta ** (-np.arange(0, d, 2) / d)) for a, d in enumerate(dims)], axis=1
    )  # (N, K/2)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[None, :, None, :]
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _complex_rope(x, pos, k, theta=10000.0):
    """numpy reference: channel pairs of x (..., N, H, K) times exp(i * angles) of positions pos (..., N, 3)."""
    dims = rope_axis_dims(k)
    angles = np.concatenate(
        [pos[..., a, None] * theta ** (-np.arange(0, d, 2) / d) for a, d in enumerate(dims)], axis=-1
    )  # (..., N, K/2)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[..., None, :]
    return np.stack([z.real, z.imag], -1).reshape(x.shape)


def test_rope_from_grid_positions_is_rope_3d_bitwise():
    for grid, k in (((3, 4, 5), 32), ((2, 3, 3), 128)):
        got = fast_jit(lambda p, k=k: rope_from_positions(p, k))(grid_positions(grid))
        for a, b in zip(got, rope_3d(grid, k)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rope_from_positions_per_example_any_positions():
    """Batched tables rotate each example by its own positions: integer (also negative), fractional and beyond
    the exact table all match the complex-rotation reference; apply_rope broadcasts (B, N, K/2) over heads."""
    k = 32
    pos = np.array([[[0, 1, 2], [-3, 4, 0], [2, 0, -7]],
                    [[0.5, 1.25, -2.5], [1500, 3, 2000], [7, 7, 7]]], np.float32)  # (B=2, N=3, 3)
    x = np.asarray(jax.random.normal(jax.random.key(8), (2, 3, 2, k)))  # (B, N, H, K)
    run = fast_jit(lambda x, p: apply_rope(x, *rope_from_positions(p, k)))
    np.testing.assert_allclose(run(jnp.asarray(x), pos), _complex_rope(x, pos.astype(np.float64), k), atol=2e-4)
    one = fast_jit(lambda x, p: apply_rope(x, *rope_from_positions(p, k)))(jnp.asarray(x[1:]), pos[1])  # (N, K/2)
    np.testing.assert_array_equal(np.asarray(run(jnp.asarray(x), pos))[1:], np.asarray(one))


def test_rope_scores_depend_only_on_offset():
    """q.k after RoPE is unchanged when both positions shift by the same 3D offset."""
    grid, k = (4, 5, 6), 32
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, k))
    kk = jax.random.normal(jax.random.key(2), (1, 1, 1, k))
    index = lambda f, h, w: (f * grid[1] + h) * grid[2] + w

    @fast_jit
    def rotated_scores(q, kk):
        """scores[i, j] = <rope(q at token i), rope(k at token j)> for all token pairs of the grid."""
        n = math.prod(grid)
        cos, sin = rope_3d(grid, k)
        rq = apply_rope(jnp.broadcast_to(q, (1, n, 1, k)), cos, sin)  # (1, N, 1, K)
        rk = apply_rope(jnp.broadcast_to(kk, (1, n, 1, k)), cos, sin)  # (1, N, 1, K)
        return jnp.einsum("nk,mk->nm", rq[0, :, 0], rk[0, :, 0])  # (N, N)

    scores = np.asarray(rotated_scores(q, kk))
    score = lambda pq, pk: float(scores[index(*pq), index(*pk)])

    offset = (1, 2, -3)
    s1 = score((0, 0, 3), tuple(a + b for a, b in zip((0, 0, 3), offset)))
    s2 = score((2, 1, 5), tuple(a + b for a, b in zip((2, 1, 5), offset)))
    s3 = score((2, 1, 5), (2, 1, 5))
    assert abs(s1 - s2) < 1e-4
    assert abs(s1 - s3) > 1e-3  # a different offset gives a different score


def test_norms_match_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 16))) * 3 + 1
    scale, bias = np.linspace(0.5, 2.0, 16), np.linspace(-1.0, 1.0, 16)

    @fast_jit
    def run(x):
        ln = LayerNorm(16, eps=1e-6, affine=True)
        ln.scale[...], ln.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
        rms = RMSNorm(16, eps=1e-6)
        return ln(x), rms(x), rms(x.astype(jnp.bfloat16))

    ln_out, rms_out, rms_bf16 = run(jnp.asarray(x))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln_out, want * scale + bias, atol=1e-5)
    np.testing.assert_allclose(rms_out, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), atol=1e-5)
    assert rms_bf16.dtype == jnp.bfloat16
    assert LayerNorm(16, affine=False).scale is None


def test_timestep_embedding_is_cos_then_sin():
    t = jnp.array([0.0, 3.0, 999.0])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    args = np.asarray(t)[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-4)


def test_patchify_roundtrip_and_patch_embed_is_strided_conv():
    patch = (1, 2, 2)
    x = jax.random.normal(jax.random.key(4), (2, 3, 4, 6, 5))
    p = patchify(x, patch)
    assert p.shape == (2, 3, 2, 3, 20)
    np.testing.assert_array_equal(unpatchify(p.reshape(2, 18, 20), (3, 2, 3), patch), x)

    @fast_jit
    def run(x):
        embed = PatchEmbed(patch, 5, 7, rngs=nnx.Rngs(0))
        embed.bias[...] = jnp.arange(7.0)
        conv = jax.lax.conv_general_dilated(
            x, embed.kernel[...], window_strides=patch, padding="VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )  # (B, T, H, W, D)
        return embed(x), conv.reshape(2, 18, 7) + jnp.arange(7.0)  # (B, N, D)

    np.testing.assert_allclose(*run(x), atol=1e-5)


def test_cross_attention_ignores_masked_keys():
    x = jax.random.normal(jax.random.key(5), (2, 6, 16))
    ctx = jax.random.normal(jax.random.key(6), (2, 5, 16))
    mask = jnp.array([[True, True, True, False, False], [True] * 5])

    @fast_jit
    def run(x, ctx):
        attn = WanAttention(16, 2, rngs=nnx.Rngs(0))
        return attn(x, ctx, kv_mask=mask), attn(x, ctx.at[:, 3:].set(100.0), kv_mask=mask)

    a, b = run(x, ctx)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # padded keys of sample 0 are ignored
    assert not np.allclose(a[1], b[1], atol=1e-3)  # sample 1 attends to all keys


def test_broadcast_and_per_query_masks():
    """(B, 1, L) is the (B, L) mask bit for bit; a per-query (B, N, L) mask (N = L, so a transposed mask would run)
    gives each query block the attention over its own keys only; cuDNN refuses per-query masks."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 6, 2, 8))  # (B, N, H, K)
    k = jax.random.normal(kk, (2, 6, 2, 8))  # (B, L, H, K)
    v = jax.random.normal(kv, (2, 6, 2, 8))
    mask = jnp.arange(6)[None, :] < jnp.array([[4], [6]])  # (B, L)
    per_query = (jnp.arange(6)[:, None] < 3) == (jnp.arange(6)[None, :] < 2)  # (N, L): queries 0-2 read keys 0-1

    @fast_jit
    def run(q, k, v):
        full = attention(q, k, v, jnp.broadcast_to(per_query, (2, 6, 6)))
        return attention(q, k, v, mask), attention(q, k, v, mask[:, None]), full, attention(q, k[:, :2], v[:, :2]), \
            attention(q, k[:, 2:], v[:, 2:])

    by_key, broadcast, full, head, tail = (np.asarray(a) for a in run(q, k, v))
    np.testing.assert_array_equal(broadcast, by_key)
    np.testing.assert_allclose(full[:, :3], head[:, :3], atol=1e-6)
    np.testing.assert_allclose(full[:, 3:], tail[:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="cuDNN attention takes per-example key lengths"):
        attention(q, k, v, jnp.broadcast_to(per_query, (2, 6, 6)), AttentionImpl.CUDNN)
    with pytest.raises(ValueError, match=r"kv_mask must be \(B, L\) or \(B, N\|1, L\)"):
        attention(q, k, v, mask[:, None, None])


def test_key_lengths_equal_right_padded_mask():
    """The cuDNN branch passes key lengths instead of a mask; for right-padded masks the two must agree."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 6, 2, 8))  # (B, N, H, K)
    k = jax.random.normal(kk, (2, 5, 2, 8))  # (B, L, H, K)
    v = jax.random.normal(kv, (2, 5, 2, 8))
    mask = jnp.arange(5)[None, :] < jnp.array([[3], [5]])  # (B, L) right-padded
    lengths = mask.astype(jnp.int32).sum(-1)
    by_len = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
    np.testing.assert_allclose(by_len, attention(q, k, v, mask), atol=1e-6)
    assert not np.allclose(attention(q, k, v, mask), attention(q, k, v, None), atol=1e-3)
