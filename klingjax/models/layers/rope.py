"""3D rotary position embedding as in Wan 2.1 (diffusers `WanRotaryPosEmbed`).

The head dimension K is split into frame / height / width parts, d_t = K - 4 (K // 6) and
d_h = d_w = 2 (K // 6). Within each part, consecutive channel pairs (2i, 2i+1) are rotated as one complex
number by angle pos * theta^(-2i / d_part), where pos is the token's frame, row or column index.
Frequencies are computed in float64 (like diffusers) and stored as float32 cos/sin tables.
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


def _axis_angles(num_positions: int, dim: int, theta: float) -> np.ndarray:
    """Angles (P, dim // 2) in float64 for positions 0..P-1 of one axis."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)  # (dim/2,)
    return np.outer(np.arange(num_positions, dtype=np.float64), inv_freq)  # (P, dim/2)


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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved channel pairs of x (B, N, H, K) by the (N, K/2) angles; returns x's dtype."""
    b, n, nh, k = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, nh, k // 2, 2)  # (B, N, H, K/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, N, H, K/2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, N, 1, K/2)
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)  # (B, N, H, K/2, 2)
    return out.reshape(b, n, nh, k).astype(x.dtype)  # (B, N, H, K)
