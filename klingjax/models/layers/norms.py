"""Normalisation layers computed in float32: LayerNorm (optionally affine) and RMSNorm.

Both mirror diffusers' numerics (`FP32LayerNorm`, `torch.nn.RMSNorm`): statistics in float32, the result
cast back to the input dtype. Affine parameters carry the logical axis name "norm".
This leaf module of layers/ also holds `logical`, the parameter-annotation helper every layer uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def logical(init: nnx.Initializer, axes: tuple[str | None, ...]) -> nnx.Initializer:
    """Annotate `init` with logical axis names, without eager sharding.

    Params are created unsharded whatever mesh is active; the caller places them by jitting the init with
    `out_shardings` from `nnx.get_partition_spec` + the rules (so tiny models can fall back to replication).
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _ones_param(dim: int, param_dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(logical(nnx.initializers.ones, ("norm",))(None, (dim,), param_dtype))


def _zeros_param(dim: int, param_dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(logical(nnx.initializers.zeros, ("norm",))(None, (dim,), param_dtype))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32; `affine=False` gives the parameter-free norm Wan uses."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = _ones_param(dim, param_dtype) if affine else None
        self.bias = _zeros_param(dim, param_dtype) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale, statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = _ones_param(dim, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (h * self.scale[...].astype(jnp.float32)).astype(x.dtype)
