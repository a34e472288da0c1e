"""Checkpoints: finding them, and the params-only restore that sampling, export and `init_from` use."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train.checkpoint import (
    ArchitectureError,
    Checkpointer,
    find_checkpoints,
    restore_model,
    restore_params,
)
from klingjax.train.state import create_trainer


class Stack(nnx.Module):
    """A few dense layers: ~4 MiB of params, so allocation differences are easy to see."""

    def __init__(self, rngs: nnx.Rngs, width: int = 512, depth: int = 4):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A stage dir `<tmp>/dit/checkpoints/1` holding a trainer whose model and EMA differ."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "config.json").write_text("{}")  # a work dir: find_checkpoints reads architectures from it
    mesh = make_mesh((-1, 1, 1, 1))
    st = create_trainer(Stack, optax.adam(1e-2), mesh, get_rules("fsdp", "dit"), seed=0)
    trainer = nnx.merge(st.graphdef, st.state)
    nnx.update(trainer.model, jax.tree.map(lambda p: p + 1.0, nnx.state(trainer.model, nnx.Param)))
    ckpt = Checkpointer(os.path.join(root, "dit", "checkpoints"), async_save=False)
    ckpt.save(1, nnx.state(trainer), {}, force=True)
    ckpt.close()
    model = jax.device_get(nnx.state(trainer.model))
    ema = jax.device_get(nnx.state(trainer.ema))
    del trainer, st
    return str(root / "dit"), mesh, model, ema


def test_find_checkpoints_accepts_stage_checkpoints_and_step_dirs(stage):
    path = stage[0]
    for p in (path, os.path.join(path, "checkpoints"), os.path.join(path, "checkpoints", "1")):
        _, (found,) = find_checkpoints(p)
        assert found.stage == "dit" and found.step == 1
    with pytest.raises(FileNotFoundError, match="step 5"):
        find_checkpoints(path, step=5)


def test_restore_model_picks_model_or_ema(stage):
    path, mesh, model, ema = stage
    for use_ema, want in ((True, ema), (False, model)):
        got = restore_model(Stack, path, mesh=mesh, rules=get_rules("fsdp", "dit"), use_ema=use_ema)
        assert isinstance(got, Stack)
        for a, b in zip(jax.tree.leaves(nnx.state(got)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_params_only_restore_allocates_no_optimizer_state(stage):
    path, mesh, _, _ = stage
    abstract = nnx.state(nnx.eval_shape(lambda: Stack(nnx.Rngs(0))))
    model_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    before = _live_bytes()
    model = restore_model(Stack, path, mesh=mesh, rules=get_rules("fsdp", "dit"))
    grown = _live_bytes() - before
    # The model's params, once: not the trainer's model + Adam mu + nu + EMA (4x).
    assert model_bytes <= grown <= 1.05 * model_bytes, (grown, model_bytes)
    assert jnp.isfinite(model(jnp.ones((2, 512)))).all()


def test_a_model_of_another_shape_is_refused(stage):
    with pytest.raises(ArchitectureError, match="does not fit"):
        restore_params(stage[0], nnx.eval_shape(lambda: Stack(nnx.Rngs(0), width=256)))
