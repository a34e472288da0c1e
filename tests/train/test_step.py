"""The generic train step on a fake model: randomness is fold_in(base_key, step), EMA follows its warm-up
formula, the state is donated, and a second player's update is the stage's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train.state import Trainer, create_trainer
from klingjax.train.step import LossContext, compile_train_step, ema_decay_at, make_train_step

EMA_DECAY = 0.9


class Scale(nnx.Module):
    """y = x * w: one (3,) parameter, so every update is easy to follow."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.w[...]


def noisy_loss(model: Scale, batch: jax.Array, key: jax.Array, ctx: LossContext):
    """MSE to a random target drawn from the step's key, so the key a step used can be read back."""
    u = jax.random.uniform(key, ())
    return jnp.mean(jnp.square(model(batch) - u)), {"u": u, "step_seen": ctx.step}


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh((-1, 1, 1, 1))
    st = create_trainer(Scale, optax.sgd(0.1), mesh, get_rules("fsdp", "dit"), seed=0)
    with jax.set_mesh(mesh):
        step_fn = compile_train_step(make_train_step(st.graphdef, noisy_loss, ema_decay=EMA_DECAY), st.shardings, mesh)
    batch = jax.device_put(jnp.arange(24.0).reshape(8, 3) / 24.0, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    return st, step_fn, batch


def _copy(state):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def test_step_key_is_fold_in_of_base_key_and_optimizer_step(setup):
    st, step_fn, batch = setup
    base = jax.random.key(7)
    state = _copy(st.state)
    for s in range(3):
        state, metrics = step_fn(state, batch, base)
        assert int(metrics["step_seen"]) == s
        assert float(metrics["u"]) == float(jax.random.uniform(jax.random.fold_in(base, s), ()))


def test_resumed_state_draws_the_same_noise_bitwise(setup):
    st, step_fn, batch = setup
    base = jax.random.key(1)
    state = _copy(st.state)
    for _ in range(3):
        state, _ = step_fn(state, batch, base)
    straight = jax.device_get(state)
    state = _copy(st.state)
    state, _ = step_fn(state, batch, base)
    saved = jax.device_get(state)  # what a checkpoint holds after step 1
    state = jax.device_put(saved, st.shardings)
    for _ in range(2):
        state, _ = step_fn(state, batch, base)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(a, b)


def test_ema_follows_the_warmup_formula(setup):
    st, step_fn, batch = setup
    state = _copy(st.state)
    ema = np.asarray(state["ema"]["w"][...])
    for s in range(3):
        state, _ = step_fn(state, batch, jax.random.key(0))
        w = np.asarray(state["model"]["w"][...])
        d = float(ema_decay_at(jnp.asarray(s), EMA_DECAY))
        assert d == pytest.approx(min(EMA_DECAY, (1 + s) / (10 + s)))
        ema = ema + (1 - d) * (w - ema)
        np.testing.assert_allclose(np.asarray(state["ema"]["w"][...]), ema, rtol=1e-6)


def test_the_state_is_donated(setup):
    st, step_fn, batch = setup
    state = _copy(st.state)
    leaves = jax.tree.leaves(state)
    new_state, _ = step_fn(state, batch, jax.random.key(0))
    assert all(a.is_deleted() for a in leaves)  # the step reused the old state's buffers
    assert not any(a.is_deleted() for a in jax.tree.leaves(new_state))


def test_a_second_player_needs_the_stages_update():
    trainer = Trainer(Scale(nnx.Rngs(0)), optax.sgd(0.1), Scale(nnx.Rngs(1)), optax.sgd(0.1))
    trainer_def = nnx.graphdef(trainer)
    step = make_train_step(trainer_def, lambda m, b, k, c: (jnp.mean(m(b) * c.disc(b)), {}), ema_decay=0.9)
    with pytest.raises(ValueError, match="player_update"):
        step(nnx.state(trainer), jnp.ones((2, 3)), jax.random.key(0))
    calls = []

    def update(tr, grads, s):
        calls.append(jax.tree.map(jnp.shape, grads))
        return {"player_grad": jnp.sum(grads["w"][...])}

    step = make_train_step(trainer_def, lambda m, b, k, c: (jnp.mean(m(b) * c.disc(b)), {}), ema_decay=0.9,
                           player_update=update)
    _, metrics = step(nnx.state(trainer), jnp.ones((2, 3)), jax.random.key(0))
    assert calls and float(metrics["player_grad"]) != 0.0  # the player's gradients reach the stage's update
