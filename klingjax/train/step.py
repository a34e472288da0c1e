"""The train step: a pure function `(state, batch, key[, frozen]) -> (state, metrics)` compiled with explicit shardings.

Every stage's loss has one signature, `loss_fn(model, batch, key, ctx: LossContext) -> (loss, metrics)`: the
context carries the optimizer step, frozen arrays passed to the step as jit arguments (LPIPS weights) and the
trainer's second player (the VAE stage's discriminator), if it has one. With a second player the returned scalar is
differentiated w.r.t. the model and that player together, and the stage's `player_update(trainer, grads, step)`
applies the player's gradients (the VAE stage gates its discriminator by a start step: `vae_losses.disc_update`).
Such a loss must stop gradients so that each player's part reaches only its own parameters, and it reports the
model's own objective as `metrics["loss"]`.

With `guard` (the default) a step whose loss or gradient norm is not finite, or whose loss spikes, is not applied:
see `klingjax.train.guard` (the whole state, optimizer step included, keeps its old value; the skip is counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from klingjax.config import TrainableConfig, TrainableMode
from klingjax.train import guard as step_guard
from klingjax.train.state import Trainer, merge_trainer, own_state
from klingjax.train.trainable import trainable_filter


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a context-taking loss sees besides (model, batch, key)."""

    step: jax.Array  # int32 scalar: optimizer steps taken before this one (0 on the first step)
    frozen: Any = None  # pytree of frozen arrays (never trained or checkpointed), e.g. {"lpips": params}
    disc: nnx.Module | None = None  # the discriminator (differentiated together with the model)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA warm-up: min(decay, (1 + step) / (10 + step)), so early averages are not dominated by init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# loss_fn(model, batch, key, ctx) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, Any, jax.Array, LossContext], tuple[jax.Array, dict[str, jax.Array]]]
# player_update(trainer, player grads, step) -> dict of scalar metrics; applies the second player's update
PlayerUpdate = Callable[[Trainer, nnx.State, jax.Array], dict[str, jax.Array]]


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, *, ema_decay: float,
                    player_update: PlayerUpdate | None = None, frozen: bool = False,
                    guard: step_guard.GuardConfig | None = step_guard.DEFAULT_GUARD,
                    trainable: TrainableConfig | None = None):
    """Return the pure step; randomness is fold_in(base_key, step) so a resumed run draws the same noise.

    `frozen`: the step takes a 4th argument, the frozen pytree, handed to the loss as `ctx.frozen`. A trainer
    with a second player (`disc`) needs `player_update`, which applies that player's gradients. `guard`: skip
    non-finite (or spiking) steps inside the step (None: apply every step, the trainer's guard is left alone).
    `trainable` (not full): the state holds no frozen params; the step takes them as its last argument (model and
    EMA read them, nothing updates them) and differentiates, updates and averages only the trained params.
    """
    full = trainable is None or trainable.mode is TrainableMode.FULL
    wrt = nnx.Param if full else trainable_filter(trainable)

    def train_step(state: nnx.State, batch: Any, base_key: jax.Array, frozen_args=None, frozen_params=None):
        old_leaves = jax.tree.leaves(state)  # the arrays a skipped step keeps (taken before merge can alias them)
        trainer: Trainer = merge_trainer(graphdef, state, frozen_params)
        step = trainer.optimizer.step[...]
        grad_norms = []
        key = jax.random.fold_in(base_key, step)
        metrics = {}
        if trainer.disc is None:
            f = lambda model: loss_fn(model, batch, key, LossContext(step, frozen_args))
            (loss, aux), grads = nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt), has_aux=True)(trainer.model)
        else:
            if player_update is None:
                raise ValueError("a trainer with a second player (disc) needs make_train_step(player_update=...)")
            f = lambda model, disc: loss_fn(model, batch, key, LossContext(step, frozen_args, disc))
            (loss, aux), (grads, d_grads) = nnx.value_and_grad(f, argnums=(nnx.DiffState(0, wrt), 1), has_aux=True)(
                trainer.model, trainer.disc)
            metrics.update(player_update(trainer, d_grads, step))
            grad_norms.append(optax.tree.norm(d_grads))
        trainer.optimizer.update(trainer.model, grads)

        d = ema_decay_at(step, ema_decay)
        params = nnx.state(trainer.model, wrt)
        ema = nnx.state(trainer.ema, wrt)
        nnx.update(trainer.ema, jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), ema, params))

        # A loss with several players reports its model's own objective as aux["loss"] (overriding the sum).
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics, **aux}
        if guard is None or trainer.guard is None:
            return own_state(trainer, trainable), metrics
        ok, reason, median = step_guard.decide(trainer.guard, metrics["loss"], [metrics["grad_norm"], *grad_norms],
                                               guard)
        loop_step = step + trainer.guard.skipped[...] + 1  # batches consumed, this one included
        trainer = merge_trainer(graphdef, step_guard.select(ok, own_state(trainer, trainable), old_leaves),
                                frozen_params)
        step_guard.record(trainer.guard, ok, reason, metrics["loss"], metrics["grad_norm"], median, loop_step, guard)
        metrics.update(skipped=(~ok).astype(jnp.int32), skipped_steps=trainer.guard.skipped[...],
                       nonfinite_streak=trainer.guard.streak[...])
        return own_state(trainer, trainable), metrics

    if frozen and not full:
        return train_step
    if frozen:
        return lambda state, batch, base_key, frozen_args: train_step(state, batch, base_key, frozen_args)
    if not full:
        return lambda state, batch, base_key, frozen_params: train_step(state, batch, base_key, None, frozen_params)
    return lambda state, batch, base_key: train_step(state, batch, base_key)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches are split on their leading axis over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def compile_train_step(train_step, state_shardings: nnx.State, mesh: jax.sharding.Mesh, *, frozen: bool = False,
                       frozen_param_shardings: nnx.State | None = None, frozen_arg_shardings: Any = None):
    """jax.jit with explicit in/out shardings and the state donated; `frozen`: a 4th argument, replicated unless
    `frozen_arg_shardings` gives its shardings (e.g. a distillation teacher sharded like its stage);
    `frozen_param_shardings`: the frozen params, a last argument (not donated)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen_in = (replicated if frozen_arg_shardings is None else frozen_arg_shardings,) if frozen else ()
    in_shardings = (state_shardings, batch_sharding(mesh), replicated) + frozen_in
    if frozen_param_shardings is not None:
        in_shardings += (frozen_param_shardings,)
    return jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
