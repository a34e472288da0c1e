"""One-process reference for the 2-process equivalence test (run as a script by test_multihost.py).

Trains the VAE stage in one process on 2 local CPU devices with the *same global batches* a 2-process run
sees: the data pipeline shards records per process (`ds[process_index::process_count]`, then shuffles), so a
plain 1-process run would read a different order. Here the global batch is assembled exactly as
`make_array_from_process_local_data` does across 2 processes: host 0's local batch, then host 1's.
Then it restores the 2-process run's final checkpoint and prints {"max_abs_diff_params": ..., ...} as JSON.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/launch/reference_one_process.py CONFIG_JSON WORKDIR OTHER_WORKDIR
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from klingjax.config import to_experiment
from klingjax.layout import checkpoint_dir
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train import stages
from klingjax.train.checkpoint import Checkpointer, abstract_with_shardings
from klingjax.train.loop import train_stage
from klingjax.train.optim import make_optimizer
from klingjax.train.state import create_trainer


class HostInterleave:
    """Iterator whose batch is the concatenation of N emulated hosts' local batches (host order)."""

    def __init__(self, iterators):
        self._its = iterators

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"hosts": [it.get_state() for it in self._its]}

    def set_state(self, state):
        for it, s in zip(self._its, state["hosts"]):
            it.set_state(s)


def main(config_json: str, workdir: str, other: str) -> None:
    exp = to_experiment(json.loads(config_json))
    spec = stages.vae_stage(exp, workdir)
    host_dataset, emulated = spec.make_dataset, 2

    def make_dataset(per_host, seed, index, count):
        assert (index, count) == (0, 1), "the reference runs in one process"
        return HostInterleave([iter(host_dataset(per_host // emulated, seed, h, emulated))
                               for h in range(emulated)])

    spec = dataclasses.replace(spec, make_dataset=make_dataset)
    mesh = make_mesh(exp.mesh.sizes)
    train_stage(spec, exp.vae, workdir=workdir, mesh=mesh, seed=exp.seed)

    # Both final states, restored onto the same mesh and shardings.
    rules = get_rules(exp.vae.sharding, spec.rules_kind)
    st = create_trainer(spec.make_model, make_optimizer(exp.vae.optim, exp.vae.steps), mesh, rules, exp.seed)
    target = abstract_with_shardings(st.abstract_state, st.shardings)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(other, "results.json")) and time.time() < deadline:
        time.sleep(0.5)  # the 2-process run may still be finishing
    states = {}
    for name, wd in (("one", workdir), ("two", other)):
        ckpt = Checkpointer(checkpoint_dir(wd, spec.name))
        states[name] = (ckpt.latest_step(), ckpt.restore(None, target)[0])
        ckpt.close()

    def max_diff(a, b):
        diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))),
                             a, b)
        return max(jax.tree.leaves(diffs), default=0.0)

    one, two = states["one"][1], states["two"][1]
    scale = max(jax.tree.leaves(jax.tree.map(lambda x: float(np.max(np.abs(np.asarray(x)))), one["model"])))
    print(json.dumps({
        "steps": [states["one"][0], states["two"][0]],
        "max_abs_diff_params": max_diff(one["model"], two["model"]),
        "max_abs_diff_ema": max_diff(one["ema"], two["ema"]),
        "max_abs_diff_state": max_diff(one, two),
        "max_abs_param": scale,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
