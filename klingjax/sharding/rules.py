"""Logical-axis rules: named presets mapping logical axis names to mesh axes, and the `shard` helper.

Parameters are annotated at creation with logical names (`nnx.with_partitioning(init, ("embed", "mlp"))`).
Activations are constrained at block boundaries with `shard(x, ("act_batch", "act_length", "act_embed"))`.
Which mesh axis a logical name lands on is data: a preset below, selected by config.

Logical names
  params:      embed, mlp, heads, kv, text_embed, vocab, norm, layers, lora_rank (LoRA factors' rank axis),
               conv_t, conv_h, conv_w, conv_in, conv_out
  activations: act_batch, act_length, act_embed, act_heads, act_kv, act_mlp, act_text_length,
               act_frames, act_height, act_width, act_channels
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH = ("data", "fsdp")

# Activation rules shared by every preset (the batch is split over data x fsdp; sequence over context).
_ACT = (
    ("act_batch", _BATCH),
    ("act_length", "context"),
    ("act_text_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_frames", None),
    ("act_height", "context"),
    ("act_width", None),
    ("act_channels", None),
)

_REPLICATED_PARAMS = (
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("text_embed", None),
    ("vocab", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
)


def _override(base: Rules, **updates) -> Rules:
    """Return `base` with the mesh axes of the named logical axes replaced."""
    unknown = set(updates) - {k for k, _ in base}
    if unknown:
        raise KeyError(f"unknown logical axes {sorted(unknown)}")
    return tuple((k, updates.get(k, v)) for k, v in base)


_DP = _ACT + _REPLICATED_PARAMS
# lora_rank: a LoRA factor whose other axis is not on fsdp (lora_b of (embed, heads) kernels, lora_a of to_out / the
# MLP's second layer) shards its rank; where the other axis already took fsdp, the rank stays whole.
_FSDP = _override(_DP, embed="fsdp", text_embed="fsdp", conv_out="fsdp", lora_rank="fsdp")
_FSDP_TP = _override(_FSDP, mlp="tensor", heads="tensor")
# Same params as fsdp_tp; tokens over "context" make the DiT's self-attention context parallel
# (klingjax.sharding.context_parallel: all-to-all or ring), heads over "tensor".
_FSDP_CP = _override(_FSDP_TP, act_length="context", act_heads="tensor")

# DiT presets: the sequence axis is tokens; VAE presets split large frames spatially (act_height), and GSPMD
# exchanges the halo rows the 3x3 convs need between neighbouring height shards.
DIT_RULES: dict[str, Rules] = {"dp": _DP, "fsdp": _FSDP, "fsdp_tp": _FSDP_TP, "fsdp_cp": _FSDP_CP}
VAE_RULES: dict[str, Rules] = {
    "dp": _DP,
    "fsdp": _FSDP,
    "fsdp_tp": _FSDP,  # VAE convs are small: no tensor parallelism, only fsdp of output channels.
    "fsdp_cp": _override(_FSDP, act_height="context"),
}
LOGICAL_AXES = frozenset(k for k, _ in _DP)


def get_rules(preset: str, model: str = "dit") -> Rules:
    """Look up a named rule preset for `model` in {"dit", "vae"}."""
    table = {"dit": DIT_RULES, "vae": VAE_RULES}[model]
    if preset not in table:
        raise ValueError(f"unknown sharding preset {preset!r} for {model}; choose one of {sorted(table)}")
    return table[preset]


def logical_to_mesh(logical: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a mesh PartitionSpec; unknown names raise (a typo must not replicate)."""
    table = dict(rules)
    out = []
    used: set[str] = set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = table[name]
        # A mesh axis may appear only once in a spec: later uses fall back to replication.
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        flat = tuple(a for a in flat if a not in used)
        used.update(flat)
        out.append(flat[0] if len(flat) == 1 else (flat or None))
    return PartitionSpec(*out)


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Replicate any dimension whose size is not divisible by its mesh axes (tiny test models)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        for a in names:
            size *= mesh.shape[a]
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def current_rules() -> Rules:
    """The logical-axis rules set by `flax.nnx.logical_axis_rules(...)` (empty outside the context)."""
    return tuple(flax_spmd.get_logical_axis_rules() or ())


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without an active mesh and rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = current_rules()
    if mesh.empty or not rules:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"shard: {len(logical_axes)} logical axes {tuple(logical_axes)} for rank-{x.ndim} array")
    spec = logical_to_mesh(logical_axes, rules)
    spec = fit_spec_to_shape(spec, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
