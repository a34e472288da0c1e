"""Fake trained workdirs for the export tests: the train loop's layout and Checkpointer, random params.

Building the Trainer state abstractly and filling it with numpy values costs no compilation, so a whole
workdir (config.json, dit/ and vae/ checkpoints at two steps, latent stats) takes about a second.
"""

import json
import os

import jax
import numpy as np
from flax import nnx

from experiments import demo
from klingjax import layout
from klingjax.config import config_from_dataclass, to_experiment
from klingjax.models.dit import WanDiT
from klingjax.models.vae import CausalVAE
from klingjax.train.checkpoint import Checkpointer
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer

TEXT_DIM = 384  # MiniLM, as the demo trains with


def random_state(abstract_state: nnx.State, seed: int) -> nnx.State:
    """Numpy values for every leaf: N(0, 1) floats (norm scales included), zero integers."""
    rng = np.random.default_rng(seed)

    def fill(a):
        if np.issubdtype(a.dtype, np.floating):
            return rng.standard_normal(a.shape).astype(a.dtype)
        return np.zeros(a.shape, a.dtype)

    return jax.tree.map(fill, abstract_state)


def perturbed_state(state: nnx.State, seed: int, scale: float) -> nnx.State:
    """A concrete state plus scale * N(0, 1) on every float leaf (zero-initialised kernels become non-zero)."""
    rng = np.random.default_rng(seed)

    def perturb(a):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            return (a + scale * rng.standard_normal(a.shape)).astype(a.dtype)
        return a

    return jax.tree.map(perturb, state)


def make_workdir(root: str, *, steps=(3, 6), dit_overrides=None, seed=0, masked_video=None,
                 perturb: float | None = None) -> tuple[str, dict]:
    """A runlocal-demo workdir with random checkpoints; returns (workdir, {stage: {step: state}}).

    masked_video: the DiT's `conditions.masked_video` ("per_token_timesteps", "channel_concat"; None: off).
    perturb: params are the models' own init + perturb * N(0, 1) (outputs stay O(1): for forward-pass parity);
    None: every float leaf is N(0, 1) (no init run, no compilation).
    """
    c = demo.get_config("runlocal")
    if masked_video is not None:
        dit_overrides = {**(dit_overrides or {}), "conditions": {"masked_video": masked_video}}
    if dit_overrides:
        c.dit.model_overrides = {**c.dit.model_overrides, **dit_overrides}
    exp = to_experiment(c)
    os.makedirs(root)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(config_from_dataclass(exp).to_json(indent=2))
    vae_cfg, dit_cfg = layout.vae_config(exp), layout.dit_model_config(exp, TEXT_DIM)
    models = {"dit": (lambda: WanDiT(dit_cfg, rngs=nnx.Rngs(0)), exp.dit),
              "vae": (lambda: CausalVAE(vae_cfg, rngs=nnx.Rngs(0)), exp.vae)}
    saved = {}
    for i, (stage, (make, scfg)) in enumerate(models.items()):
        tx = make_optimizer(scfg.optim, scfg.steps)
        if perturb is None:
            abstract = nnx.state(nnx.eval_shape(lambda make=make, tx=tx: Trainer(make(), tx)))
        else:
            concrete = nnx.state(Trainer(make(), tx))
        ckpt = Checkpointer(os.path.join(root, stage, "checkpoints"), async_save=False)
        saved[stage] = {}
        for step in steps:
            if perturb is None:
                state = random_state(abstract, seed + 10 * i + step)
            else:
                state = perturbed_state(concrete, seed + 10 * i + step, perturb)
            ckpt.save(step, state, {}, force=True)
            saved[stage][step] = state
        ckpt.close()
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "latents"))
    with open(os.path.join(root, "latents", "latent_stats.json"), "w") as f:
        json.dump({"mean": rng.normal(size=vae_cfg.z_dim).tolist(),
                   "std": rng.uniform(0.5, 2, vae_cfg.z_dim).tolist()}, f)
    return root, saved
