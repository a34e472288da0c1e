"""Optimiser: AdamW with linear warmup and cosine decay, global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

from klingjax.config import OptimConfig, VAEStageConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio (or constant)."""
    warmup = max(1, min(cfg.warmup_steps, total_steps))
    if not cfg.decay:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with clipping; weight decay skips 1-D params (norm scales, biases)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_ndim_mask),
    )


def make_disc_optimizer(cfg: VAEStageConfig) -> optax.GradientTransformation:
    """The discriminator's optimiser: the stage's, at `disc.lr` (0: the stage's lr), counting its own steps.

    The VAE stage leaves the discriminator (and this optimiser's state) untouched before `disc.start`, so its
    warmup and decay run over the `steps - disc.start` steps it trains.
    """
    optim = dataclasses.replace(cfg.optim, lr=cfg.disc.lr or cfg.optim.lr)
    return make_optimizer(optim, max(1, cfg.steps - cfg.disc.start))


def _ndim_mask(params):
    """True for params that get weight decay (matrices and kernels)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, params)
