"""Dense layers with their init, the attention kernel wrapper, and Wan's attention layer (self or cross).

Init choices for the whole DiT live here, in one place (they follow Wan's `init_weights`): xavier-uniform
linear kernels with zero biases, N(0, 0.02) for the time/text embedder MLPs, xavier-uniform over the
flattened patch for the patch embedding, N(0, 1/dim) for the modulation tables, ones for norm scales.
Kernels are (in, out), so a torch `Linear.weight` maps to `kernel.T`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from klingjax.models.layers.lora import Dense
from klingjax.models.layers.norms import RMSNorm, logical
from klingjax.models.layers.rope import apply_rope
from klingjax.sharding.context_parallel import ContextParallel, context_parallel_attention, context_parallel_enabled
from klingjax.sharding.rules import current_rules

# ---------------------------------------------------------------------------------------------------------
# Init choices
# ---------------------------------------------------------------------------------------------------------

LINEAR_INIT = nnx.initializers.xavier_uniform()
EMBEDDER_INIT = nnx.initializers.normal(stddev=0.02)
PATCH_INIT = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)  # kernel (pt, ph, pw, C, D)
BIAS_INIT = nnx.initializers.zeros


def table_init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Modulation-table init N(0, 1/dim), as diffusers' `randn(1, k, dim) / dim**0.5`."""
    return jax.random.normal(key, shape, dtype) / jnp.sqrt(shape[-1]).astype(dtype)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: nnx.Initializer = LINEAR_INIT,
) -> Dense:
    """A biased linear layer whose kernel (in, out) carries logical `axes` and whose bias carries axes[1]
    (a `Dense`: an `nnx.Linear` that can take LoRA factors)."""
    return Dense(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init, axes),
        bias_init=logical(BIAS_INIT, (axes[1],)),
        rngs=rngs,
    )


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


class AttentionImpl(enum.Enum):
    """Backend passed to `jax.nn.dot_product_attention(implementation=...)`."""

    DEFAULT = None  # let JAX pick
    XLA = "xla"
    CUDNN = "cudnn"  # GPU flash attention (bf16/fp16)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None = None, impl: AttentionImpl = AttentionImpl.XLA
) -> jax.Array:
    """Softmax attention on (B, N, H, K) queries and (B, L, H, K) keys/values; kv_mask True = attend.

    kv_mask is (B, L) (the same keys for every query), (B, 1, L) (the same, broadcast) or (B, N, L) (per query:
    query n reads key l where mask[b, n, l]). With cuDNN the mask must be right-padded and the same for every
    query (text masks are): cuDNN takes per-example key lengths, not a broadcast (B, 1, 1, L) mask, which it
    would reject as a bias of the wrong length; a per-query mask raises.
    """
    if kv_mask is not None:
        if kv_mask.ndim not in (2, 3):
            raise ValueError(f"kv_mask must be (B, L) or (B, N|1, L), got shape {kv_mask.shape}")
        kv_mask = kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask  # (B, N|1, L)
    if kv_mask is not None and impl is AttentionImpl.CUDNN:
        if kv_mask.shape[1] != 1:
            raise ValueError(f"cuDNN attention takes per-example key lengths, not a per-query mask (got "
                             f"{kv_mask.shape}); use attention_impl=xla (or default) for per-query masks")
        lengths = kv_mask[:, 0].astype(jnp.int32).sum(-1)  # (B,) real keys
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    mask = None if kv_mask is None else kv_mask[:, None].astype(bool)  # (B, 1, N|1, L): broadcast over heads
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl.value)  # (B, N, H, K)


class WanAttention(nnx.Module):
    """Multi-head attention with QK RMSNorm across all heads and optional 3D RoPE (diffusers `WanAttention`).

    Self-attention when `context` is None; cross-attention to `context` (B, L, D) otherwise. `to_out` is a
    one-element list so parameter paths read `to_out.0` like diffusers. Under a mesh whose "context" axis
    splits the tokens (act_length -> "context"), self-attention runs the `context_parallel` strategy; cross-
    attention needs none (each query shard attends to the replicated text).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_norm: bool = True,
        eps: float = 1e-6,
        impl: AttentionImpl = AttentionImpl.XLA,
        context_parallel: ContextParallel = ContextParallel.ALL_TO_ALL,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.context_parallel = context_parallel
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = dense(dim, dim, ("embed", "heads"), **kw)
        self.to_out = nnx.List([dense(dim, dim, ("heads", "embed"), **kw)])
        self.norm_q = RMSNorm(dim, eps=eps, param_dtype=param_dtype) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps=eps, param_dtype=param_dtype) if qk_norm else None

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        rope: tuple[jax.Array, jax.Array] | None = None,
        kv_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x (B, N, D) -> (B, N, D); rope = (cos, sin) tables ([B,] N, K/2); kv_mask (B, [N|1,] L), see `attention`."""
        kv_in = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(kv_in), self.to_v(kv_in)  # (B, N, D), (B, L, D), (B, L, D)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        b, n, d = q.shape
        nh = self.num_heads
        q = q.reshape(b, n, nh, d // nh)  # (B, N, H, K)
        k = k.reshape(b, k.shape[1], nh, d // nh)  # (B, L, H, K)
        v = v.reshape(b, v.shape[1], nh, d // nh)  # (B, L, H, K)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mesh, rules = jax.sharding.get_abstract_mesh(), current_rules()
        if context is None and context_parallel_enabled(mesh, rules):
            local = functools.partial(attention, impl=self.impl)
            out = context_parallel_attention(q, k, v, kv_mask, strategy=self.context_parallel, attn_fn=local)
        else:
            out = attention(q, k, v, kv_mask, self.impl)  # (B, N, H, K)
        out = out.reshape(b, n, d)  # (B, N, D)
        return self.to_out[0](out)
