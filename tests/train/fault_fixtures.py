"""The toy stage the fault-injection tests train: a 4x4 linear map on synthetic Grain data (~1 s to compile),
through the real `train_stage` loop, checkpointer and metric writer; helpers to read what a run left behind."""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.config import OptimConfig, StageConfig
from klingjax.sharding.rules import get_rules
from klingjax.train.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
)
from klingjax.train.loop import StageSpec, train_stage
from klingjax.train.optim import make_optimizer
from klingjax.train.state import create_trainer

BATCH = 8  # the 8 fake CPU devices of tests/conftest.py split it
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------
# The toy stage
# ---------------------------------------------------------------------------------------------------------


class Linear4(nnx.Module):
    """y = x @ w: one (4, 4) parameter."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (4, 4)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.w[...]  # (B, 4)


TARGET = np.arange(16, dtype=np.float32).reshape(4, 4) / 16.0


def toy_loss(model: Linear4, batch, key, ctx, *, nan_at_optimizer_step: int = -1):
    """MSE to a fixed linear map; NaN when the optimizer step equals `nan_at_optimizer_step` (a state fault)."""
    x = batch["x"]
    loss = jnp.mean(jnp.square(model(x) - x @ TARGET))
    return jnp.where(ctx.step == nan_at_optimizer_step, NAN, loss), {}


def _example(i: int, nan_batches: frozenset[int]) -> dict:
    x = np.random.default_rng(i).standard_normal(4).astype(np.float32)
    if i // BATCH in nan_batches:  # loop step k trains on batch k - 1
        x[:] = NAN
    return {"x": x, "index": np.int64(i)}


def toy_spec(*, nan_steps=(), nan_at_optimizer_step: int = -1, on_sample=None) -> StageSpec:
    """The toy stage; `nan_steps`: loop steps (1-based) whose batch is NaN (a data fault)."""
    nan_batches = frozenset(k - 1 for k in nan_steps)

    def dataset(per_host, seed, index, count):
        ds = grain.MapDataset.range(1 << 20).map(lambda i: _example(i, nan_batches))
        return ds.to_iter_dataset().batch(per_host)

    loss = lambda m, b, k, c: toy_loss(m, b, k, c, nan_at_optimizer_step=nan_at_optimizer_step)
    return StageSpec("toy", "dit", Linear4, loss, dataset, lambda d: {"x": d["x"]}, on_sample)


def toy_config(**kw) -> StageConfig:
    base = dict(batch_size=BATCH, steps=10, log_every=1, checkpoint_every=2, keep_checkpoints=2,
                optim=OptimConfig(lr=0.05, warmup_steps=1, grad_clip=0.0))
    return StageConfig(**{**base, **kw})


def run_toy(workdir, mesh, spec=None, **cfg):
    return train_stage(spec or toy_spec(), toy_config(**cfg), workdir=str(workdir), mesh=mesh, seed=0)


def saved_states(workdir, mesh, window: int = 32) -> dict[int, nnx.State]:
    """Every kept checkpoint of the toy stage, fully restored (train state)."""
    tx = make_optimizer(toy_config().optim, 10)  # the structure of the train loop's optimizer state
    st = create_trainer(Linear4, tx, mesh, get_rules("fsdp", "dit"), 0, guard_window=window)
    ckpt = Checkpointer(os.path.join(workdir, "toy", "checkpoints"))
    target = abstract_with_shardings(st.abstract_state, st.shardings)
    out = {s: ckpt.restore(s, target)[0] for s in ckpt.all_steps()}
    ckpt.close()
    return out


def records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "toy_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
