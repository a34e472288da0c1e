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
    loss_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Weighted MSE between predicted and true velocity; returns (scalar loss, per-sample loss (B,)).

    `predict_velocity(x_t, t) -> v` closes over the model and its conditioning. loss_mask: bool, x0's shape or its
    leading axes (e.g. (B, t, h, w) for latents (B, t, h, w, C)), True = counted; each sample's loss is then the
    mean over its counted elements (0 if none), and the rest get no gradient. None (or all True): the plain mean.
    """
    x_t = schedules.add_noise(x0, noise, t)
    v = predict_velocity(x_t, t).astype(jnp.float32)
    target = schedules.velocity_target(x0, noise)
    axes = tuple(range(1, x0.ndim))
    if loss_mask is None:
        per_sample = jnp.mean(jnp.square(v - target), axis=axes)  # (B,)
    else:
        if loss_mask.shape != x0.shape[: loss_mask.ndim]:
            raise ValueError(f"loss_mask of shape {loss_mask.shape} must be x0's shape {x0.shape} or its leading axes")
        mask = jnp.broadcast_to(loss_mask.reshape(loss_mask.shape + (1,) * (x0.ndim - loss_mask.ndim)), x0.shape)
        se = jnp.where(mask, jnp.square(v - target), 0.0)  # where, not *: no gradient from the excluded elements
        count = jnp.sum(mask, axis=axes, dtype=jnp.float32)  # (B,)
        per_sample = jnp.sum(se, axis=axes) / jnp.maximum(count, 1.0)  # (B,)
    return jnp.mean(per_sample * loss_weight(t, weighting)), per_sample
