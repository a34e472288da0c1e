"""The configuration of `klingjax.models.dit.WanDiT`: `DiTConfig`, its enums, the size variants and `dit_config`
(a variant with overrides, as config files give them). Re-exported by klingjax.models.dit."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax.numpy as jnp

from klingjax.models.conditions import ConditionSpec
from klingjax.models.layers.attention import AttentionImpl
from klingjax.models.layers.lora import LoRAConfig
from klingjax.sharding.context_parallel import ContextParallel


class RematPolicy(enum.Enum):
    """What each block keeps for the backward pass."""

    NONE = "none"  # no rematerialisation
    FULL = "full"  # keep only the block input; recompute everything
    DOTS_SAVEABLE = "dots_saveable"  # keep matmul outputs without batch dims; recompute the rest


class AttentionLayout(enum.Enum):
    """Which tokens each block's self-attention connects."""

    JOINT_3D = "joint_3d"  # every token with every token of the clip (Wan 2.1)
    FACTORIZED = "factorized"  # within each frame, then across frames at each (h, w) location


class TextAttention(enum.Enum):
    """How video tokens read the caption."""

    CROSS = "cross"  # a cross-attention layer after self-attention (Wan 2.1)
    JOINT = "joint"  # text keys/values appended to self-attention; the text stream is a fixed context


_ENUM_FIELDS = {"remat": RematPolicy, "attention_impl": AttentionImpl, "attention_layout": AttentionLayout,
                "text_attention": TextAttention, "context_parallel": ContextParallel}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Architecture and execution settings of `WanDiT` (dim = num_heads * head_dim)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # Latent channels C of the model input (= the VAE's z_dim). CHANNEL_CONCAT's patch embedding reads C + 1 more
    # (`ConditionSpec.patch_channels`) through its own kernel, so this stays C whatever the conditions (diffusers'
    # Wan I2V counts 36 = 16 + 4 + 16 instead; export/dit_map.py fuses the two kernels into that layout).
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    scan_layers: bool = True
    remat: RematPolicy = RematPolicy.NONE
    attention_impl: AttentionImpl = AttentionImpl.DEFAULT
    attention_layout: AttentionLayout = AttentionLayout.JOINT_3D
    text_attention: TextAttention = TextAttention.CROSS
    context_parallel: ContextParallel = ContextParallel.ALL_TO_ALL  # used when a mesh splits tokens over "context"
    conditions: ConditionSpec = ConditionSpec()  # which conditions the model reads; default = Wan T2V (text)
    lora: LoRAConfig | None = None  # LoRA factors on the matching linear layers (fine-tuning); None: none
    dtype: Any = jnp.float32  # compute dtype of matmuls; norms, modulation and time MLP stay float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or len(self.patch_size) != 3:
            raise ValueError(f"need an even head_dim (got {self.head_dim}) and a 3D patch (got {self.patch_size})")
        for name, kind in _ENUM_FIELDS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"DiTConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if not isinstance(self.conditions, ConditionSpec):
            raise TypeError(f"DiTConfig.conditions must be a ConditionSpec, got {self.conditions!r}")
        if self.lora is not None and not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"DiTConfig.lora must be a LoRAConfig or None, got {self.lora!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_VARIANTS: dict[str, DiTConfig] = {
    # CPU demos; text_dim matches the MiniLM text encoder (384).
    "XS": DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_dim=384),
    "S": DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=384),
    # Wan 2.1 published sizes (umT5-XXL text, 4096-d).
    "1.3B": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "14B": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
}


def _coerce(name: str, value: Any) -> Any:
    """A config-file value as the DiTConfig field type: enum values -> enums, lists -> tuples, dtype names."""
    kind = _ENUM_FIELDS.get(name)
    if kind is not None and not isinstance(value, kind):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"DiT field {name!r}: {value!r} is not one of {[m.value for m in kind]}") from None
    if name in ("dtype", "param_dtype") and isinstance(value, str):
        return jnp.dtype(value)
    if name == "conditions" and isinstance(value, dict):
        return ConditionSpec.from_config(value)
    if name == "lora":
        return LoRAConfig.from_config(value)
    return tuple(value) if isinstance(value, list) else value


def dit_config(variant: str, **overrides) -> DiTConfig:
    """A variant from `DIT_VARIANTS` with fields replaced by `overrides` (enum fields also take their values)."""
    if variant not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {sorted(DIT_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown := sorted(set(overrides) - fields):
        raise ValueError(f"unknown DiT field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(DIT_VARIANTS[variant], **{k: _coerce(k, v) for k, v in overrides.items()})
