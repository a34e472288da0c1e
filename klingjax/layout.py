"""Work-directory layout and experiment glue: where each stage keeps its files, the model configs and latent scale.

    <workdir>/config.json               the ExperimentConfig the run used
    <workdir>/data/                     the synthetic dataset (unless data.path points elsewhere)
    <workdir>/{vae,dit}/checkpoints/    each stage's Orbax checkpoints (`stage_dir`)
    <workdir>/latents/                  cached latents + latent_stats.json (per-channel mean, std)

A leaf above `config` and `models`: train, eval, export, data_pipelines and the entry points read paths and
model configs here, so none of them imports another for glue.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from klingjax.config import ExperimentConfig, TrainableMode, to_experiment
from klingjax.diffusion import schedules
from klingjax.models.dit import DiTConfig, dit_config
from klingjax.models.layers.lora import LoRAConfig
from klingjax.models.vae import VAEConfig
from klingjax.models.vae import vae_config as vae_config_of

# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def data_dir(exp: ExperimentConfig, workdir: str) -> str:
    """The dataset folder: `data.path`, or `<workdir>/data` for the built-in synthetic data."""
    return exp.data.path or os.path.join(workdir, "data")


def latent_dir(workdir: str) -> str:
    """The latent cache written by the cache stage."""
    return os.path.join(workdir, "latents")


def stage_dir(workdir: str, name: str) -> str:
    """A train stage's folder (`vae`, `dit`): checkpoints, samples."""
    return os.path.join(workdir, name)


def checkpoint_dir(workdir: str, name: str) -> str:
    """A train stage's Orbax checkpoint folder."""
    return os.path.join(stage_dir(workdir, name), "checkpoints")


def vae_workdir(exp: ExperimentConfig, workdir: str) -> str:
    """The work dir whose VAE (checkpoints, latent normalisation) `exp` uses: `vae.from_workdir` or `workdir`."""
    return exp.vae.from_workdir or workdir


def load_workdir_config(workdir: str) -> ExperimentConfig:
    """The `ExperimentConfig` a klingjax-train work dir ran with (its config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} has no config.json; is it a klingjax-train work dir?")
    with open(path) as f:
        return to_experiment(ml_collections.ConfigDict(json.load(f)))


def load_latent_stats(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the cached latents, written by the cache stage."""
    path = os.path.join(latent_dir(workdir), "latent_stats.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the 'cache' stage first")
    with open(path) as f:
        stats = json.load(f)
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


# ---------------------------------------------------------------------------------------------------------
# Model configs of an experiment
# ---------------------------------------------------------------------------------------------------------


def vae_config(exp: ExperimentConfig) -> VAEConfig:
    """The VAE variant named by `vae.variant` with `vae.model_overrides` applied (validated by `to_experiment`)."""
    return vae_config_of(exp.vae.variant, **exp.vae.model_overrides)


def dit_model_config(exp: ExperimentConfig, text_dim: int) -> DiTConfig:
    """The DiT variant with channels tied to the VAE, the text width tied to the text encoder and LoRA factors when
    `dit.trainable.mode` is lora."""
    z, t = vae_config(exp).z_dim, exp.dit.trainable
    lora = LoRAConfig(t.lora_rank, t.lora_alpha, t.lora_targets) if t.mode is TrainableMode.LORA else None
    return dit_config(exp.dit.variant, in_channels=z, out_channels=z, text_dim=text_dim, lora=lora,
                      **exp.dit.model_overrides)


def latent_grid(exp: ExperimentConfig) -> tuple[int, int, int, int]:
    """(t, h, w, c) of one clip's latents."""
    vc = vae_config(exp)
    return (*vc.latent_shape(exp.data.num_frames, exp.data.height, exp.data.width), vc.z_dim)


def train_shift(exp: ExperimentConfig) -> float:
    """Timestep shift: the configured one, or the resolution/length-dependent default."""
    if exp.dit.timestep_shift > 0:
        return exp.dit.timestep_shift
    t, h, w, _ = latent_grid(exp)
    pt, ph, pw = dit_model_config(exp, 1).patch_size
    return schedules.resolution_shift((t // pt) * (h // ph) * (w // pw))
