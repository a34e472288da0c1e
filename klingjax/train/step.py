"""The train step: a pure function `(state, batch, key) -> (state, metrics)` compiled with explicit shardings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from klingjax.train.state import Trainer

# loss_fn(model, batch, key) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA warm-up: min(decay, (1 + step) / (10 + step)), so early averages are not dominated by init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, *, ema_decay: float):
    """Return the pure step; randomness is fold_in(base_key, step) so a resumed run draws the same noise."""

    def train_step(state: nnx.State, batch: Mapping[str, jax.Array], base_key: jax.Array):
        trainer: Trainer = nnx.merge(graphdef, state)
        step = trainer.optimizer.step[...]
        key = jax.random.fold_in(base_key, step)
        grad_fn = nnx.value_and_grad(lambda model: loss_fn(model, batch, key), has_aux=True)
        (loss, aux), grads = grad_fn(trainer.model)
        trainer.optimizer.update(trainer.model, grads)

        d = ema_decay_at(step, ema_decay)
        params = nnx.state(trainer.model, nnx.Param)
        ema = nnx.state(trainer.ema, nnx.Param)
        nnx.update(trainer.ema, jax.tree.map(lambda e, p: e + (1.0 - d) * (p - e), ema, params))

        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return nnx.state(trainer), metrics

    return train_step


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches are split on their leading axis over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def compile_train_step(train_step, state_shardings: nnx.State, mesh: jax.sharding.Mesh):
    """jax.jit with explicit in/out shardings and the state donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
