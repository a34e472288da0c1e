"""Train state: model + optimiser + EMA as one NNX module, created abstract-first and sharded on the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from klingjax.config import TrainableConfig, TrainableMode
from klingjax.sharding.rules import Rules, fit_spec_to_shape, logical_to_mesh
from klingjax.train.guard import StepGuard
from klingjax.train.trainable import check_patterns, frozen_dtype, frozen_filter, trainable_filter


class Trainer(nnx.Module):
    """Everything a train step updates: the model, its optimiser state and an EMA copy of the params.

    `wrt` selects the trained params (`klingjax.train.trainable`); the EMA module has the model's structure, but
    `create_trainer` splits the frozen params of model and EMA out of the state (one buffer serves both).
    Optionally a discriminator with its own optimiser (VAE GAN training). Without one, `disc` and
    `disc_optimizer` are None, which NNX keeps out of the state: the checkpoint tree is
    `{model, optimizer, ema, guard}` (`guard`: the step guard's skip counters and loss ring buffer).
    With one it adds the top-level `disc` and `disc_optimizer` subtrees, so `model` and `ema` (what export,
    `init_from` and the generator loaders read) stay exactly the model's params.
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, disc: nnx.Module | None = None,
                 disc_tx: optax.GradientTransformation | None = None, *, guard_window: int = 32,
                 wrt: nnx.filterlib.Filter = nnx.Param):
        if (disc is None) != (disc_tx is None):
            raise ValueError("Trainer: a discriminator needs its own optimiser (pass disc and disc_tx, or neither)")
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)  # optimiser state only for the trained params
        self.ema = nnx.clone(model)  # EMA of params; initialised to the params (bias-free from step 0).
        self.disc = disc
        self.disc_optimizer = nnx.Optimizer(disc, disc_tx, wrt=nnx.Param) if disc is not None else None
        self.guard = StepGuard(guard_window)

    @property
    def step(self) -> jax.Array:
        return self.optimizer.step[...]


@dataclasses.dataclass(frozen=True)
class ShardedTrainer:
    """The split trainer: static graph, sharded state and the shardings it lives on.

    With frozen params (`trainable` not full), `state` leaves them out and `frozen` holds them once (model-relative
    paths; the EMA reads the same buffers): `merge` puts the trainer back together from both.
    """

    graphdef: nnx.GraphDef
    state: nnx.State
    shardings: nnx.State
    abstract_state: nnx.State
    frozen: nnx.State | None = None
    frozen_shardings: nnx.State | None = None
    frozen_abstract: nnx.State | None = None
    trainable: TrainableConfig | None = None


def merge_trainer(graphdef: nnx.GraphDef, state: nnx.State, frozen: nnx.State | None = None) -> Trainer:
    """The trainer from its state and (if split out) its frozen params, shared by the model and its EMA."""
    if frozen is None:
        return nnx.merge(graphdef, state)
    return nnx.merge(graphdef, state, nnx.State({"model": frozen, "ema": frozen}))


def own_state(trainer: Trainer, trainable: TrainableConfig | None) -> nnx.State:
    """The trainer's state without its frozen params (what the step returns and checkpoints hold)."""
    frozen = frozen_filter(trainable) if trainable is not None else None
    return nnx.state(trainer) if frozen is None else nnx.state(trainer, nnx.Not(frozen))


def state_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for every leaf from its logical annotations (dims that don't divide replicate).

    Uses our `logical_to_mesh`, which rejects unknown names and drops a mesh axis already used by an
    earlier dimension (e.g. a square (embed, embed) kernel shards only its first dim).
    """

    def sharding(v: nnx.Variable) -> NamedSharding:
        names = v.get_metadata().get("out_sharding")
        spec = logical_to_mesh(names, rules) if names else PartitionSpec()
        return v.replace(NamedSharding(mesh, fit_spec_to_shape(spec, v.shape, mesh)))

    # Leaves stay wrapped in their Variables, so the tree matches the state's structure exactly.
    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_trainer(
    make_model: Callable[[nnx.Rngs], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Rules,
    seed: int,
    *,
    make_disc: Callable[[nnx.Rngs], nnx.Module] | None = None,
    disc_tx: optax.GradientTransformation | None = None,
    guard_window: int = 32,
    trainable: TrainableConfig | None = None,
    where: str = "trainable",
) -> ShardedTrainer:
    """Build the trainer shape-only, derive shardings, then initialise directly onto the mesh.

    `make_disc` (with `disc_tx`) adds a discriminator, initialised from its own seed stream; `guard_window` sizes
    the step guard's loss ring buffer. `trainable` (None: full) selects the trained params; its patterns are
    checked against the model here, before anything compiles (ConfigError naming `where`).
    """
    full = trainable is None or trainable.mode is TrainableMode.FULL
    wrt = nnx.Param if full else trainable_filter(trainable)

    def init() -> Trainer:
        disc = make_disc(nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 1))) if make_disc else None
        return Trainer(make_model(nnx.Rngs(seed)), tx, disc, disc_tx if make_disc else None,
                       guard_window=guard_window, wrt=wrt)

    # No mesh is set while building: shardings come from our rules via out_shardings, not from eager
    # placement at creation (flax's eager path does not resolve two dims mapping to one mesh axis).
    if not full:
        check_patterns(trainable, nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))), where)
    graphdef = nnx.graphdef(nnx.eval_shape(init))
    abstract_state, frozen_abstract = jax.eval_shape(lambda: split_frozen(init(), trainable))
    shardings = state_shardings(abstract_state, mesh, rules)
    if full:
        state = jax.jit(lambda: split_frozen(init(), trainable)[0], out_shardings=shardings)()
        return ShardedTrainer(graphdef, state, shardings, abstract_state)
    frozen_shardings = state_shardings(frozen_abstract, mesh, rules)
    state, fixed = jax.jit(lambda: split_frozen(init(), trainable), out_shardings=(shardings, frozen_shardings))()
    return ShardedTrainer(graphdef, state, shardings, abstract_state, fixed, frozen_shardings, frozen_abstract,
                          trainable)


def split_frozen(trainer: Trainer, trainable: TrainableConfig | None) -> tuple[nnx.State, nnx.State | None]:
    """(the trainer's own state, its frozen params (model-relative, in `trainable.frozen_dtype`) or None)."""
    frozen = frozen_filter(trainable) if trainable is not None else None
    if frozen is None:
        return nnx.state(trainer), None
    _, fixed, rest = nnx.split(trainer, frozen, ...)
    dtype = frozen_dtype(trainable)
    return rest, jax.tree.map(lambda a: a.astype(dtype), fixed["model"])


def param_count(state: nnx.State, part: str = "model") -> int:
    """Number of trainable parameters of the model (or `part`, e.g. "disc") inside a trainer state."""
    leaves = jax.tree.leaves(state[part], is_leaf=lambda x: isinstance(x, nnx.Variable))
    return int(sum(np.prod(v.shape) for v in leaves if isinstance(v, nnx.Param)))


def per_device_bytes(state: nnx.State) -> dict[str, int]:
    """Bytes each device holds for `state` (sharded arrays count only their local shard)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
