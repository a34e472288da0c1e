"""Fixtures of the generation tests: a kling runlocal work dir of init-scale random params (loading, encoding,
sampling and writing run as on a trained one) and one cached generator loader, so each sampler shape compiles once."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import kling
from klingjax import layout
from klingjax.config import config_from_dataclass, to_experiment
from klingjax.eval.generate import load_workdir_generator
from klingjax.models.dit import WanDiT
from klingjax.models.text_encoders import BertConfig
from klingjax.models.vae import CausalVAE
from klingjax.train.checkpoint import Checkpointer
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer


def init_like(abstract: nnx.State, seed: int) -> nnx.State:
    """Numpy values at init scale for an abstract state: norm scales 1, biases 0, kernels N(0, 1 / fan_in), other
    floats N(0, 0.01), integers 0 (no compilation: a jitted init of both models costs ~10 s on CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path).split("'")[-2]
        if not np.issubdtype(a.dtype, np.floating) or name == "bias":
            return np.zeros(a.shape, a.dtype)
        if name in ("gamma", "scale"):
            return np.ones(a.shape, a.dtype)
        std = 1 / np.sqrt(np.prod(a.shape[:-1])) if name == "kernel" else 0.1
        return (std * rng.standard_normal(a.shape)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def make_workdir(root: str, config) -> str:
    """A work dir of `config` (config.json, latent stats, vae/ and dit/ checkpoints of init-scale params)."""
    exp = to_experiment(config)
    os.makedirs(layout.latent_dir(root))
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(config_from_dataclass(exp).to_json(indent=2))
    vae_cfg, dit_cfg = layout.vae_config(exp), layout.dit_model_config(exp, BertConfig().dim)
    models = {"vae": (lambda: CausalVAE(vae_cfg, rngs=nnx.Rngs(0)), exp.vae),
              "dit": (lambda: WanDiT(dit_cfg, rngs=nnx.Rngs(1)), exp.dit)}
    for i, (stage, (make, scfg)) in enumerate(models.items()):
        tx = make_optimizer(scfg.optim, scfg.steps)
        abstract = nnx.state(nnx.eval_shape(lambda make=make, tx=tx: Trainer(make(), tx)))
        ckpt = Checkpointer(layout.checkpoint_dir(root, stage), async_save=False)
        ckpt.save(1, init_like(abstract, i), {}, force=True)
        ckpt.close()
    with open(os.path.join(layout.latent_dir(root), "latent_stats.json"), "w") as f:
        json.dump({"mean": [0.0] * vae_cfg.z_dim, "std": [1.0] * vae_cfg.z_dim}, f)
    return root


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> str:
    return make_workdir(str(tmp_path_factory.mktemp("kling") / "wd"), kling.get_config("runlocal"))


@pytest.fixture(scope="session")
def loader():
    """`load_workdir_generator`, cached: one generator (and its compiled samplers) for every test."""
    return functools.cache(load_workdir_generator)
