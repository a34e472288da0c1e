"""LoRA on linear layers: low-rank factors beside a frozen kernel, stored as Flax NNX `LoRAParam` variables.

Every linear layer of the DiT is a `Dense` (an `nnx.Linear`: same `kernel`/`bias` paths, so export and import maps
are unchanged). `add_lora` attaches factors to the `Dense` layers whose path matches a target pattern; such a layer
computes

    y = x @ kernel + bias + (x @ lora_a) @ lora_b * (alpha / rank)

with `lora_a` (in, r) drawn like PEFT's (uniform, bound 1/sqrt(in)) and `lora_b` (r, out) zero, so a model with fresh
factors computes exactly what its base computes. Stacked layers (the DiT's blocks, a leading "layers" axis) get
stacked factors; the factors carry the kernel's logical axis names (`lora_a`: (..., in, lora_rank), `lora_b`:
(..., lora_rank, out)), so the sharding rules place them like the kernel they adapt (and FSDP presets shard the rank
axis of a factor whose other axis is not sharded). `LoRAParam` subclasses `nnx.Param`:
optimisers and EMA see the factors as params, and `nnx.LoRAParam` selects them alone.

Patterns are regular expressions searched (`re.search`) in the layer's path with "/" separators, e.g.
`blocks/attn1/to_q`, `blocks/ffn/net/0/proj`, `condition_embedder/time_proj`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Wan LoRA trainers (diffusers, musubi-tuner, ai-toolkit) adapt the attention projections and the MLP of every block.
DEFAULT_TARGETS: tuple[str, ...] = ("blocks/attn1/", "blocks/attn2/", "blocks/ffn/")
RANK_AXIS = "lora_rank"  # logical name of the factors' rank axis (fsdp presets shard it where the other axis is not)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, scale and target layers of LoRA (`alpha` 0: alpha = rank, a scale of 1)."""

    rank: int
    alpha: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"LoRA alpha must be >= 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target pattern")
        for p in self.targets:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"LoRA target {p!r} is not a regular expression: {e}") from None

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @classmethod
    def from_config(cls, value: Any) -> LoRAConfig | None:
        """From a config-file dict (lists become tuples); None / empty stays None."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        if not value:
            return None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(value).items()})


class Dense(nnx.Linear):
    """`nnx.Linear` that adds its LoRA branch when `add_lora` gave it factors (none by default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora_a is None:
            return y
        dtype = self.dtype or x.dtype
        a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
        return y + ((x.astype(dtype) @ a) @ b * jnp.asarray(self.lora_scale, dtype)).astype(y.dtype)


def path_name(path: tuple) -> str:
    """A graph path as the "/"-joined string patterns are matched against."""
    return "/".join(str(k) for k in path)


def dense_layers(model: nnx.Module) -> dict[str, Dense]:
    """Every `Dense` layer of `model` by path name."""
    return {path_name(p): m for p, m in nnx.iter_graph(model) if isinstance(m, Dense)}


def unmatched(patterns: tuple[str, ...], names: list[str]) -> list[str]:
    """The patterns that match none of `names`."""
    return [p for p in patterns if not any(re.search(p, n) for n in names)]


def add_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Attach LoRA factors to the `Dense` layers of `model` matching `cfg.targets`; returns their path names.

    Raises ValueError naming any target pattern that matches no linear layer.
    """
    layers = dense_layers(model)
    if missing := unmatched(cfg.targets, list(layers)):
        raise ValueError(f"LoRA target pattern(s) {missing} match no linear layer; the linear layers are "
                         f"{sorted(layers)}")
    chosen = sorted(n for n in layers if any(re.search(p, n) for p in cfg.targets))
    for name in chosen:
        layer = layers[name]
        kernel = layer.kernel
        *lead, fan_in, fan_out = kernel.shape
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        batch = tuple(range(len(lead)))
        # PEFT's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(in), 1/sqrt(in)).
        init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                                   batch_axis=batch)
        a = init_a(rngs.params(), (*lead, fan_in, cfg.rank), layer.param_dtype)
        b = jnp.zeros((*lead, cfg.rank, fan_out), layer.param_dtype)
        layer.lora_a = nnx.LoRAParam(a, out_sharding=(*names[:-1], RANK_AXIS), eager_sharding=False)
        layer.lora_b = nnx.LoRAParam(b, out_sharding=(*names[:-2], RANK_AXIS, names[-1]), eager_sharding=False)
        layer.lora_scale = cfg.scale
    return chosen


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every LoRA branch of `model` into its kernel (kernel += a @ b * scale) and drop the factors, in place.

    Returns the merged layers' path names. The merged model is the base architecture (no `LoRAParam` left).
    """
    merged = []
    for name, layer in dense_layers(model).items():
        if layer.lora_a is None:
            continue
        a, b = layer.lora_a[...].astype(jnp.float32), layer.lora_b[...].astype(jnp.float32)
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * layer.lora_scale
        layer.kernel[...] = (layer.kernel[...].astype(jnp.float32) + delta).astype(layer.kernel.dtype)
        layer.lora_a = layer.lora_b = None
        layer.lora_scale = 1.0
        merged.append(name)
    return merged
