"""Rectified-flow training loss with optional timestep weighting."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from klingjax.diffusion import schedules


class LossWeighting(enum.Enum):
    """Per-sample weight w(t) on the velocity MSE."""

    NONE = "none"
    COSMAP = "cosmap"  # SD3's cosine-mapped weighting: 2 / (pi (1 - 2t + 2t^2)).


def loss_weight(t: jax.Array, weighting: LossWeighting) -> jax.Array:
    """w(t) for each sample, shape (B,)."""
    if weighting is LossWeighting.NONE:
        return jnp.ones_like(t)
    if weighting is LossWeighting.COSMAP:
        return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    raise ValueError(f"unknown loss weighting {weighting}")


def flow_matching_loss(
    predict_velocity,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    *,
    weighting: LossWeighting = LossWeighting.NONE,
) -> tuple[jax.Array, jax.Array]:
    """Weighted MSE between predicted and true velocity; returns (scalar loss, per-sample loss (B,)).

    `predict_velocity(x_t, t) -> v` closes over the model and its conditioning.
    """
    x_t = schedules.add_noise(x0, noise, t)
    v = predict_velocity(x_t, t).astype(jnp.float32)
    target = schedules.velocity_target(x0, noise)
    per_sample = jnp.mean(jnp.square(v - target), axis=tuple(range(1, x0.ndim)))  # (B,)
    return jnp.mean(per_sample * loss_weight(t, weighting)), per_sample
