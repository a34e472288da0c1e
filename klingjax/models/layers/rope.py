"""3D rotary position embedding as in Wan 2.1 (diffusers `WanRotaryPosEmbed`).

The head dimension K is split into frame / height / width parts, d_t = K - 4 (K // 6) and
d_h = d_w = 2 (K // 6). Within each part, consecutive channel pairs (2i, 2i+1) are rotated as one complex
number by angle pos * theta^(-2i / d_part), where pos is the token's frame, row or column index.
Frequencies are computed in float64 (like diffusers) and stored as float32 cos/sin tables. `rope_3d` builds the
tables of a whole (t, h, w) grid on the host; `rope_from_positions` builds them on device for any per-token
positions (multi-shot offsets, references outside the clip), bit-equal to `rope_3d` on the grid's positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (frame, height, width) positions; each part is even."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """Rotation frequencies theta^(-2i / dim) (dim // 2,) of one axis, in float64."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)  # (dim/2,)


def _axis_angles(num_positions: int, dim: int, theta: float) -> np.ndarray:
    """Angles (P, dim // 2) in float64 for positions 0..P-1 of one axis."""
    return np.outer(np.arange(num_positions, dtype=np.float64), _inv_freq(dim, theta))  # (P, dim/2)


def grid_positions(grid: tuple[int, int, int]) -> np.ndarray:
    """(N, 3) int32 (t, h, w) positions of the N = t*h*w tokens of a grid, row-major: the default positions."""
    return np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3).astype(np.int32)


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (N, K/2) for the N = t*h*w tokens of a (t, h, w) grid, in row-major token order."""
    t, h, w = grid
    d_t, d_h, d_w = rope_axis_dims(head_dim)
    # Per-axis tables are tiny float64 constants; the (N, K/2) broadcast happens on device.
    tables = []
    for size, dim in ((t, d_t), (h, d_h), (w, d_w)):
        ang = _axis_angles(size, dim, theta)
        tables.append((jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)))

    def grid_table(i: int) -> jax.Array:
        f, hh, ww = tables[0][i], tables[1][i], tables[2][i]
        parts = (
            jnp.broadcast_to(f[:, None, None, :], (t, h, w, d_t // 2)),
            jnp.broadcast_to(hh[None, :, None, :], (t, h, w, d_h // 2)),
            jnp.broadcast_to(ww[None, None, :, :], (t, h, w, d_w // 2)),
        )
        return jnp.concatenate(parts, axis=-1).reshape(t * h * w, head_dim // 2)  # (N, K/2)

    return grid_table(0), grid_table(1)


def rope_from_positions(
    positions: jax.Array, head_dim: int, theta: float = 10000.0, max_position: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (..., N, K/2) for tokens at (t, h, w) `positions` (..., N, 3), in token-grid units.

    Integer positions with |p| < max_position read float64-computed tables (diffusers precomputes the same 1024
    positions), so the grid's positions give exactly `rope_3d`; other positions (fractional, farther) are
    rotated in float32 on device.
    """
    pos = jnp.asarray(positions).astype(jnp.float32)  # (..., N, 3)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        p = pos[..., axis]  # (..., N)
        exact = ((p == jnp.round(p)) & (jnp.abs(p) < max_position))[..., None]  # (..., N, 1)
        row = jnp.where(exact[..., 0], jnp.abs(p), 0).astype(jnp.int32)  # (..., N) table row of |p|
        sign = jnp.where(p < 0, -1.0, 1.0)[..., None]  # (..., N, 1): sin is odd, cos even
        angles = _axis_angles(max_position, dim, theta)  # (P, dim/2) float64 host constant
        cos_t, sin_t = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
        direct = p[..., None] * jnp.asarray(_inv_freq(dim, theta), jnp.float32)  # (..., N, dim/2)
        cos_parts.append(jnp.where(exact, cos_t[row], jnp.cos(direct)))  # (..., N, dim/2)
        sin_parts.append(jnp.where(exact, sign * sin_t[row], jnp.sin(direct)))
    return jnp.concatenate(cos_parts, axis=-1), jnp.concatenate(sin_parts, axis=-1)  # 2 x (..., N, K/2)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved channel pairs of x (B, N, H, K) by (N, K/2) or per-example (B, N, K/2) angles."""
    b, n, nh, k = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, nh, k // 2, 2)  # (B, N, H, K/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, N, H, K/2)
    c, s = cos[..., None, :], sin[..., None, :]  # (N, 1, K/2) or (B, N, 1, K/2): broadcast over heads
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)  # (B, N, H, K/2, 2)
    return out.reshape(b, n, nh, k).astype(x.dtype)  # (B, N, H, K)
