"""Rectified-flow schedules: x_t = (1 - t) x_0 + t e, timestep sampling and resolution-dependent shift."""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp


class TimestepSampling(enum.Enum):
    """How training timesteps t in (0, 1) are drawn."""

    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"


def time_shift(t: jax.Array, shift: float) -> jax.Array:
    """Warp t towards 1 (more noise) for shift > 1: t' = s t / (1 + (s - 1) t) (SD3 / Wan)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    num_tokens: int, *, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """Shift that grows with the token count (frames x height x width): exp of a line through two anchors.

    More tokens carry more redundant signal, so the same t destroys less information; shifting t
    up compensates (SD3 section 5.3.2; Flux uses the same anchors).
    """
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_tokens - base_tokens)
    return float(math.exp(mu))


def sample_timesteps(
    key: jax.Array,
    batch: int,
    *,
    method: TimestepSampling = TimestepSampling.LOGIT_NORMAL,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    eps: float = 1e-5,
) -> jax.Array:
    """Draw (batch,) training timesteps in [eps, 1 - eps]."""
    if method is TimestepSampling.LOGIT_NORMAL:
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
    elif method is TimestepSampling.UNIFORM:
        t = jax.random.uniform(key, (batch,))
    else:
        raise ValueError(f"unknown timestep sampling {method}")
    return jnp.clip(time_shift(t, shift), eps, 1.0 - eps)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t e, with t of shape (B,) broadcast over the remaining axes."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))  # (B, 1, ..., 1)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow velocity dx_t/dt = e - x_0."""
    return noise - x0


def sampling_timesteps(num_steps: int, shift: float = 1.0) -> jax.Array:
    """Decreasing grid t_0 = 1 > ... > t_N = 0 of num_steps + 1 points, shifted like training."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return time_shift(jnp.linspace(1.0, 0.0, num_steps + 1), shift)
