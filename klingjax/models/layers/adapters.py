"""Zero-initialised condition adapters of the DiT: each leaves the base model's output unchanged at init, so a model
with one can start from a checkpoint without it (`init_from` keeps their init: `dit.ADAPTER_PARAMS`).

  * camera (`ConditionSpec.camera`): `CameraEmbedder` (per-latent-frame path -> D, shared) feeding each chosen
    block's zero-initialised `camera_proj`; `CameraGate` switches a block's adapter on or off.
  * flow map (`ConditionSpec.flow_map`): `IntervalEmbedder`, the jump length t - r of a flow-map (MeanFlow) student
    -> D, added to the time embedding before the shared modulation projection; its last layer is zero, so at init
    the student predicts its teacher's instantaneous velocity for every jump.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from klingjax.models.layers.attention import dense
from klingjax.models.layers.embeddings import timestep_embedding


class CameraGate(nnx.Variable):
    """A block's fixed 0/1 factor on its camera adapter (FIRST_BLOCKS: 1 in the first blocks only); not trained."""


class CameraEmbedder(nnx.Module):
    """Per-latent-frame camera path (B, t, 4) -> (B, t, D): fixed per-dimension scales (px -> ~1, log scale and roll
    -> ~1), then Linear -> SiLU -> Linear, shared by every block's adapter."""

    SCALES = (0.25, 0.25, 5.0, 4.0)  # (oy, ox) px, log_scale, roll rad: typical clip-long values -> ~1

    def __init__(self, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = dense(4, dim, (None, "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("embed", "mlp"), **kw)

    def __call__(self, camera: jax.Array) -> jax.Array:
        x = camera.astype(jnp.float32) * jnp.asarray(self.SCALES, jnp.float32)
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class IntervalEmbedder(nnx.Module):
    """Jump lengths h = t - r (B,) in [0, 1] -> (B, D) float32: the sinusoidal features of 1000 h (the timesteps'
    scale), Linear -> SiLU -> zero-initialised Linear (MeanFlow embeds (t, t - r) the same way)."""

    def __init__(self, freq_dim: int, dim: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.linear_1 = dense(freq_dim, dim, (None, "embed"), **kw)
        self.linear_2 = dense(dim, dim, ("embed", None), kernel_init=nnx.initializers.zeros, **kw)

    def __call__(self, interval: jax.Array) -> jax.Array:
        features = timestep_embedding(interval.astype(jnp.float32) * 1000.0, self.freq_dim)  # (B, freq_dim)
        return self.linear_2(jax.nn.silu(self.linear_1(features)))
