"""Text -> video generation: CFG sampling of DiT latents, un-normalisation, VAE decode to uint8 clips.

`load_generator` builds one from a trained work dir (params only, no optimizer state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from klingjax import layout
from klingjax.config import ExperimentConfig, SampleConfig
from klingjax.diffusion import samplers
from klingjax.diffusion.guidance import guided_velocity
from klingjax.models.conditions import Conditions
from klingjax.models.text_encoders import load_text_encoder
from klingjax.train.stages import trained_dit, trained_vae


@dataclasses.dataclass(frozen=True)
class VideoGenerator:
    """A trained DiT + VAE + frozen text encoder; `__call__(captions, key)` returns uint8 (N, T, H, W, 3)."""

    dit: nnx.Module
    vae: nnx.Module
    text_encoder: object  # klingjax.models.text_encoders.FrozenTextEncoder
    latent_shape: tuple[int, int, int, int]  # (t, h, w, c)
    latent_mean: np.ndarray  # (c,)
    latent_std: np.ndarray  # (c,)
    sample: SampleConfig
    text_max_len: int
    shift: float

    def __post_init__(self):
        object.__setattr__(self, "_fn", _make_sample_fn(self))

    def __call__(self, captions: Sequence[str], key: jax.Array, *, batch_size: int = 16,
                 negative_prompt: str | None = None, dit: nnx.Module | None = None) -> np.ndarray:
        """Generate one clip per caption (batched); the same key and captions give the same clips.

        `dit` swaps in other params of the same architecture (e.g. the EMA model during training) without
        recompiling: params are arguments of the compiled sampler.
        """
        neg = self.sample.negative_prompt if negative_prompt is None else negative_prompt
        dit_state = nnx.state(self.dit if dit is None else dit)
        out = []
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start:start + batch_size])
            n = len(chunk)
            chunk += [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compilation
            cond = Conditions(*self.text_encoder.encode(chunk, self.text_max_len))
            uncond = Conditions(*self.text_encoder.encode([neg] * batch_size, self.text_max_len))  # negative prompt
            noise = jax.random.normal(jax.random.fold_in(key, start), (batch_size, *self.latent_shape))
            videos = self._fn(dit_state, nnx.state(self.vae), cond, uncond, noise)
            # The batch may span other processes' devices: gather it (a collective every process joins).
            out.append(np.asarray(multihost_utils.process_allgather(videos, tiled=True))[:n])
        return np.concatenate(out, axis=0)


def _make_sample_fn(gen: VideoGenerator):
    dit_def, vae_def = nnx.graphdef(gen.dit), nnx.graphdef(gen.vae)
    cfg = gen.sample
    mean = jnp.asarray(gen.latent_mean)
    std = jnp.asarray(gen.latent_std)
    shift = cfg.shift if cfg.shift > 0 else gen.shift

    @jax.jit
    def fn(dit_state, vae_state, cond: Conditions, uncond: Conditions, noise):
        vae = nnx.merge(vae_def, vae_state)

        def velocity(x, t, dit_state):
            tt = jnp.full((x.shape[0],), t * 1000.0, x.dtype)  # (B,) in [0, 1000]
            # Params ride in the sampler's loop carry and the module is merged inside the loop body:
            # NNX modules must live at the trace level they run in.
            dit = nnx.merge(dit_def, dit_state)
            return guided_velocity(dit, x, tt, cond, uncond, cfg.cfg_scale)  # (B, t, h, w, c)

        z = samplers.sample(velocity, noise, num_steps=cfg.num_steps, sampler=cfg.sampler, shift=shift,
                            args=(dit_state,))
        z = z * std + mean  # back to the VAE's latent scale
        x = vae.decode_streaming(z)  # (B, T, H, W, 3) in [-1, 1]; constant memory in T
        return jnp.round((x + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)

    return fn


def load_generator(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, text_encoder=None,
                   dit: nnx.Module | None = None) -> VideoGenerator:
    """The trained DiT (EMA if `sample.use_ema`) + VAE (EMA) + text encoder of `workdir` as a VideoGenerator.

    Params only: the models are built abstractly and restored without optimizer state. `dit` (e.g. the model
    being trained) replaces the DiT checkpoint; `text_encoder` an already loaded encoder.
    """
    text_encoder = text_encoder if text_encoder is not None else load_text_encoder(exp.text_encoder)
    vae = trained_vae(exp, workdir, mesh)
    if dit is None:
        dit = trained_dit(exp, workdir, mesh, text_dim=text_encoder.dim, use_ema=exp.sample.use_ema)
    mean, std = layout.load_latent_stats(workdir)
    return VideoGenerator(dit=dit, vae=vae, text_encoder=text_encoder, latent_shape=layout.latent_grid(exp),
                          latent_mean=mean, latent_std=std, sample=exp.sample, text_max_len=exp.text_max_len,
                          shift=layout.train_shift(exp))


def load_workdir_generator(workdir: str) -> tuple[ExperimentConfig, VideoGenerator]:
    """(config, generator) of a finished experiment work dir, from its `config.json` and checkpoints."""
    from klingjax.sharding.mesh import make_mesh

    exp = layout.load_workdir_config(workdir)
    return exp, load_generator(exp, workdir, make_mesh(exp.mesh.sizes))
