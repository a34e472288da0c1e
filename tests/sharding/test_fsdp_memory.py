"""FSDP really splits memory: on an fsdp=8 mesh each device holds ~1/8 of the DiT's params + AdamW state."""

import math

import jax
import numpy as np
from flax import nnx

from klingjax.config import OptimConfig
from klingjax.models.dit import WanDiT, dit_config
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer, state_shardings

# Every matrix has a dim divisible by 8 (256, 1024, 16*2*2=64 out features, 256 text/freq dims).
CFG = dit_config("XS", dim=256, ffn_dim=1024, num_heads=4, num_layers=2, in_channels=16, out_channels=16, text_dim=256)
BIG = 2**14


def _abstract_trainer_and_shardings():
    """The trainer (model + AdamW + EMA) built shape-only, and its shardings under the DiT "fsdp" preset."""
    mesh = make_mesh((1, 8, 1, 1))
    tx = make_optimizer(OptimConfig(weight_decay=0.01), 100)
    abstract = nnx.eval_shape(lambda: Trainer(WanDiT(CFG, rngs=nnx.Rngs(0)), tx))
    _, abstract_state = nnx.split(abstract)
    return mesh, abstract_state, state_shardings(abstract_state, mesh, get_rules("fsdp"))


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _bytes_on(device, variables, shardings) -> tuple[int, int]:
    """(bytes of the shards `device` holds, total bytes) over matching Variable leaves."""
    local = total = 0
    for var, sh in zip(_leaves(variables), _leaves(shardings)):
        shape, itemsize = var.shape, np.dtype(var.dtype).itemsize
        index = sh.get_value().devices_indices_map(shape)[device]  # the slice of the global array it holds
        local += math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape)) * itemsize
        total += math.prod(shape) * itemsize
    return local, total


def test_fsdp_splits_params_and_adamw_state_eight_ways():
    mesh, state, shardings = _abstract_trainer_and_shardings()
    params = _leaves(state["model"])
    param_shardings = _leaves(shardings["model"])
    big = [(v, s.get_value()) for v, s in zip(params, param_shardings) if math.prod(v.shape) >= BIG]
    assert len(big) >= 10  # q/k/v/out x 2 attentions, 2 MLP matrices, embedders, patch embedding, proj_out
    replicated = [v.shape for v, s in big if s.is_fully_replicated]
    assert not replicated, f"params with >= {BIG} elements left replicated under fsdp: {replicated}"
    assert all("fsdp" in str(s.spec) for _, s in big)

    device0 = mesh.devices.flat[0]
    for part in (["model", "optimizer"], ["model", "optimizer", "ema"]):
        local = total = 0
        for key in part:
            lo, to = _bytes_on(device0, state[key], shardings[key])
            local, total = local + lo, total + to
        assert total > 10e6  # ~3M params x 3 (param, Adam mu, nu) x 4 bytes: the check is not vacuous
        assert local <= 1.05 * total / 8, f"{part}: device 0 holds {local} of {total} bytes ({8 * local / total:.3f}/8)"
