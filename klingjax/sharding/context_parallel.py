"""Context (sequence) parallel self-attention with `jax.shard_map` over the "context" mesh axis.

q, k, v (B, N, H, K) arrive with the sequence axis split over "context" (C devices), the batch over
data x fsdp and the heads over whatever the rules give "act_heads" ("tensor", T devices). Two strategies
compute exactly the single-device softmax attention:

  * ALL_TO_ALL (DeepSpeed-Ulysses): all_to_all turns (B, N/C, H/T, K) shards into (B, N, H/(T*C), K), each
    device runs ordinary full attention on its heads, and a second all_to_all turns the result back.
    Two collectives per call; needs (H/T) % C == 0.
  * RING: each device keeps its query block and passes its K/V block around the ring of C devices
    (`ppermute`), folding every block into an online softmax with float32 accumulators (running max,
    denominator, numerator). Works for any head count; C - 1 neighbour exchanges, overlappable with compute.

`validate_parallelism` checks sizes up front so a bad config fails with a message naming them, not in XLA.
Cross-attention needs none of this: the local query shard attends to the replicated text keys.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from klingjax.sharding.rules import Rules, current_rules, logical_to_mesh

CONTEXT_AXIS = "context"
ACT_BNHK = ("act_batch", "act_length", "act_heads", "act_kv")

# attn_fn(q (B, N, H, K), k (B, L, H, K), v (B, L, H, K), kv_mask (B, L) | None) -> (B, N, H, K)
AttnFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]
AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


class ContextParallel(enum.Enum):
    """How self-attention is computed when the sequence is split over the "context" mesh axis."""

    ALL_TO_ALL = "all_to_all"  # Ulysses: swap sequence <-> heads sharding, attend locally, swap back
    RING = "ring"  # pass K/V blocks around the ring with an online softmax


def _axes(entry) -> tuple[str, ...]:
    """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _size(mesh: AnyMesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _axes(entry))


def context_parallel_enabled(mesh: AnyMesh, rules: Rules) -> bool:
    """True when `mesh` has a "context" axis of size > 1 and `rules` put "act_length" exactly on it."""
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] == 1 or not rules:
        return False
    return dict(rules).get("act_length") == CONTEXT_AXIS


def validate_parallelism(
    num_heads: int,
    seq_len: int,
    mesh: AnyMesh,
    rules: Rules,
    strategy: ContextParallel = ContextParallel.ALL_TO_ALL,
) -> None:
    """Raise ValueError (naming the sizes) if attention with these heads/tokens cannot run on `mesh` + `rules`.

    Call it on config + mesh before compiling; the attention layers call it again at trace time.
    """
    spec = logical_to_mesh(ACT_BNHK, rules)
    heads_axes, heads_size = _axes(spec[2]), _size(mesh, spec[2])
    if num_heads % heads_size:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by the {'x'.join(heads_axes)} mesh size {heads_size} that the "
            f"sharding rules put attention heads on; change num_heads or the mesh"
        )
    if not context_parallel_enabled(mesh, rules):
        return
    c = mesh.shape[CONTEXT_AXIS]
    if seq_len % c:
        raise ValueError(
            f"sequence length {seq_len} (tokens = t*h*w / patch) is not divisible by the context mesh axis size {c}; "
            f"change the clip/latent size or the context axis"
        )
    local_heads = num_heads // heads_size
    if strategy is ContextParallel.ALL_TO_ALL and local_heads % c:
        raise ValueError(
            f"all-to-all context parallelism needs the heads per tensor shard ({num_heads} heads / {heads_size} = "
            f"{local_heads}) to be divisible by the context mesh axis size {c}; use ContextParallel.RING instead"
        )


# ---------------------------------------------------------------------------------------------------------
# Per-shard kernels (run inside shard_map; shapes below are per device)
# ---------------------------------------------------------------------------------------------------------


def _ulysses(q, k, v, kv_mask, *, attn_fn: AttnFn):
    """All-to-all attention on shards q/k/v (b, n/C, h, K) -> (b, n/C, h, K)."""
    # Split heads C ways, gather the sequence: (b, n/C, h, K) -> (b, n, h/C, K).
    to_heads = lambda x: jax.lax.all_to_all(x, CONTEXT_AXIS, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    if kv_mask is not None:
        kv_mask = jax.lax.all_gather(kv_mask, CONTEXT_AXIS, axis=1, tiled=True)  # (b, L/C) -> (b, L)
    out = attn_fn(q, k, v, kv_mask)  # (b, n, h/C, K)
    # And back: (b, n, h/C, K) -> (b, n/C, h, K).
    return jax.lax.all_to_all(out, CONTEXT_AXIS, split_axis=1, concat_axis=2, tiled=True)


def _fold_block(stats, q, k, v, mask, scale):
    """Fold one K/V block into the online-softmax stats (numer (b,h,n,K), run_max (b,h,n), denom (b,h,n)), in fp32.

    `stats` None starts from this block. q (b, n, h, K), k / v (b, l, h, K), mask (b, l) or None.
    """
    s = jnp.einsum("bnhk,blhk->bhnl", q, k, preferred_element_type=jnp.float32) * scale  # (b, h, n, l)
    if mask is not None:
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    # The result is exactly invariant to the running max, so it carries no gradient (and no inf - inf).
    blk_max = jax.lax.stop_gradient(s.max(-1))  # (b, h, n)
    new_max = blk_max if stats is None else jnp.maximum(stats[1], blk_max)
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # all keys so far masked: exp(-inf) = 0 below
    p = jnp.exp(s - safe_max[..., None])  # (b, h, n, l)
    pv = jnp.einsum("bhnl,blhk->bhnk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # (b, h, n, K)
    if stats is None:
        return pv, new_max, p.sum(-1)
    numer, run_max, denom = stats
    corr = jnp.exp(run_max - safe_max)  # (b, h, n): rescales the old sums (0 while they were empty, max = -inf)
    return numer * corr[..., None] + pv, new_max, denom * corr + p.sum(-1)


def _ring(q, k, v, kv_mask, *, ring_size: int):
    """Ring attention on shards q/k/v (b, n/C, h, K) -> (b, n/C, h, K) with float32 accumulators."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    perm = [(i, (i + 1) % ring_size) for i in range(ring_size)]  # each device sends its block to the next
    rotate = lambda blk: jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, perm), blk)

    block = (k, v, kv_mask)
    stats = _fold_block(None, q, *block, scale)  # the local block first
    block = rotate(block)

    def step(carry, _):
        stats, block = carry
        nxt = rotate(block)  # issued before the compute that does not depend on it, so the two can overlap
        return (_fold_block(stats, q, *block, scale), nxt), None

    # Blocks 1 .. C-2 inside the scan, block C-1 after it: exactly C-1 exchanges in total.
    (stats, block), _ = jax.lax.scan(step, (stats, block), None, length=ring_size - 2)
    numer, _, denom = _fold_block(stats, q, *block, scale)
    out = numer / jnp.where(denom > 0, denom, 1.0)[..., None]  # (b, h, n, K); rows with every key masked give 0
    return out.transpose(0, 2, 1, 3).astype(q.dtype)  # (b, n, h, K)


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------


def _default_attn(q, k, v, kv_mask):
    mask = None if kv_mask is None else kv_mask[:, None, None, :].astype(bool)  # (B, 1, 1, L)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_mask: jax.Array | None = None,
    *,
    strategy: ContextParallel = ContextParallel.ALL_TO_ALL,
    mesh: AnyMesh | None = None,
    rules: Rules | None = None,
    attn_fn: AttnFn = _default_attn,
) -> jax.Array:
    """Self-attention of q, k, v (B, N, H, K) with N split over "context"; kv_mask (B, N) True = attend.

    `mesh` / `rules` default to the active ones (`jax.set_mesh`, `nnx.logical_axis_rules`). `attn_fn` is the
    local kernel of the all-to-all strategy. Returns (B, N, H, K) sharded like q. A query whose keys are all
    masked gets zeros from RING (jax.nn.dot_product_attention averages all values instead).
    """
    mesh_arg, mesh = mesh, (jax.sharding.get_abstract_mesh() if mesh is None else mesh)
    rules = current_rules() if rules is None else rules
    if not context_parallel_enabled(mesh, rules):
        raise ValueError(
            "context_parallel_attention needs an active mesh with a 'context' axis of size > 1 and rules mapping "
            f"act_length -> 'context'; got mesh {dict(mesh.shape) if not mesh.empty else None} and "
            f"act_length -> {dict(rules).get('act_length')!r}"
        )
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"context-parallel self-attention needs equal q/k/v shapes: {q.shape}, {k.shape}, {v.shape}")
    b, n, h, _ = q.shape
    if kv_mask is not None and kv_mask.shape != (b, n):
        raise ValueError(f"kv_mask must be (B, N) = {(b, n)}, got {kv_mask.shape}")
    validate_parallelism(h, n, mesh, rules, strategy)

    spec = logical_to_mesh(ACT_BNHK, rules)
    batch = spec[0] if b % _size(mesh, spec[0]) == 0 else None  # a batch the data axes cannot split is replicated
    qkv_spec = PartitionSpec(batch, CONTEXT_AXIS, spec[2], None)  # (B, N, H, K)
    mask_spec = PartitionSpec(batch, CONTEXT_AXIS)  # (B, N)

    if strategy is ContextParallel.ALL_TO_ALL:
        kernel = lambda q, k, v, m: _ulysses(q, k, v, m, attn_fn=attn_fn)
    elif strategy is ContextParallel.RING:
        kernel = lambda q, k, v, m: _ring(q, k, v, m, ring_size=mesh.shape[CONTEXT_AXIS])
    else:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}; choose one of {list(ContextParallel)}")

    if kv_mask is None:
        fn = jax.shard_map(
            lambda q, k, v: kernel(q, k, v, None), mesh=mesh_arg, in_specs=(qkv_spec,) * 3, out_specs=qkv_spec
        )
        return fn(q, k, v)
    fn = jax.shard_map(kernel, mesh=mesh_arg, in_specs=(qkv_spec,) * 3 + (mask_spec,), out_specs=qkv_spec)
    return fn(q, k, v, kv_mask.astype(bool))
