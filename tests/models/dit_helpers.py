"""Shared by the DiT tests: a short Adam overfit of a model on one batch (and `helpers.fast_jit`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from helpers import fast_jit  # noqa: F401  (re-exported for the DiT tests)


def overfit_losses(graphdef: nnx.GraphDef, params: nnx.State, inputs: tuple, target: jax.Array,
                   steps: int = 30, lr: float = 3e-3) -> list[float]:
    """MSE of `merge(graphdef, params)(*inputs)` to `target` over `steps` Adam steps on the one batch."""
    tx = optax.adam(lr)

    @fast_jit
    def step(params, opt_state):
        loss_fn = lambda p: jnp.mean((nnx.merge(graphdef, p)(*inputs) - target) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses
