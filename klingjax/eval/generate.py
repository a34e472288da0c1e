"""Text -> video generation: CFG sampling of DiT latents, un-normalisation, VAE decode to uint8 clips."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from klingjax.config import SampleConfig
from klingjax.diffusion import samplers


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
                 negative_prompt: str | None = None) -> np.ndarray:
        """Generate one clip per caption (batched); the same key and captions give the same clips."""
        neg = self.sample.negative_prompt if negative_prompt is None else negative_prompt
        out = []
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start:start + batch_size])
            n = len(chunk)
            chunk += [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compilation
            ctx, mask = self.text_encoder.encode(chunk, self.text_max_len)
            neg_ctx, neg_mask = self.text_encoder.encode([neg] * batch_size, self.text_max_len)
            noise = jax.random.normal(jax.random.fold_in(key, start), (batch_size, *self.latent_shape))
            videos = self._fn(nnx.state(self.dit), nnx.state(self.vae), jnp.asarray(ctx), jnp.asarray(mask),
                              jnp.asarray(neg_ctx), jnp.asarray(neg_mask), noise)
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
    def fn(dit_state, vae_state, ctx, mask, neg_ctx, neg_mask, noise):
        vae = nnx.merge(vae_def, vae_state)
        both_ctx = jnp.concatenate([ctx, neg_ctx])  # (2B, L, D): conditional then negative/unconditional
        both_mask = jnp.concatenate([mask, neg_mask])

        def velocity(x, t, dit_state):
            b = x.shape[0]
            tt = jnp.full((2 * b,), t * 1000.0, x.dtype)
            # Params ride in the sampler's loop carry and the module is merged inside the loop body:
            # NNX modules must live at the trace level they run in.
            dit = nnx.merge(dit_def, dit_state)
            v = dit(jnp.concatenate([x, x]), tt, both_ctx, both_mask)  # (2B, t, h, w, c)
            v_c, v_u = v[:b], v[b:]
            return v_u + cfg.cfg_scale * (v_c - v_u)

        z = samplers.sample(velocity, noise, num_steps=cfg.num_steps, sampler=cfg.sampler, shift=shift,
                            args=(dit_state,))
        z = z * std + mean  # back to the VAE's latent scale
        x = vae.decode_streaming(z)  # (B, T, H, W, 3) in [-1, 1]; constant memory in T
        return jnp.round((x + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)

    return fn
