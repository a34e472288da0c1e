"""LoRA factors of a WanDiT -> a diffusers / PEFT LoRA file that `WanPipeline.load_lora_weights` reads.

A `Dense` layer with factors computes y = x @ kernel + bias + (x @ lora_a) @ lora_b * scale (models/layers/lora.py),
with kernel (in, out), lora_a (in, r), lora_b (r, out), scale = alpha / rank. PEFT's `lora.Linear` computes
y = x W^T + b + lora_B(lora_A(x)) * lora_alpha / r with lora_A.weight (r, in), lora_B.weight (out, r). The file holds

    transformer.<module>.lora_A.weight = lora_a.T                 (r, in)
    transformer.<module>.lora_B.weight = (lora_b * scale).T       (out, r)

for each adapted layer (one pair per block of a stacked layer), where <module> is the layer's diffusers module name
(its kernel's export name without ".weight", from `dit_map.dit_entries`). The scale is folded into B, so the file
needs no alpha: diffusers loads a LoRA without alphas or metadata with lora_alpha = r (scale 1), which computes
exactly what klingjax computes. No `lora_adapter_metadata` is written (PEFT infers r and the target modules from the
tensors), so `pipe.load_lora_weights(folder)` / `transformer.load_lora_adapter(...)` and other diffusers-format
readers all see plain PEFT keys.

    write_lora(folder, cfg, read)   # folder/pytorch_lora_weights.safetensors + folder/lora_config.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

import numpy as np
from flax import nnx
from numpy.typing import DTypeLike

from klingjax.export import dit_map
from klingjax.export.param_map import Entry, Layout, check_unique, to_torch
from klingjax.export.safetensors_io import ShardedWriter, TensorSpec
from klingjax.models.dit import DiTConfig
from klingjax.models.layers.lora import Dense

LORA_WEIGHTS = "pytorch_lora_weights"  # diffusers' LORA_WEIGHT_NAME_SAFE without ".safetensors"
LORA_CONFIG = "lora_config.json"
PREFIX = "transformer"  # the pipeline component the keys address (WanLoraLoaderMixin.transformer_name)
FACTORS = {"lora_a": "lora_A", "lora_b": "lora_B"}  # klingjax leaf -> PEFT module

Reader = Callable[[tuple[str, ...], int | None], np.ndarray]  # (leaf path, layer or None) -> one klingjax array


@dataclasses.dataclass(frozen=True)
class LoRAEntry(Entry):
    """One PEFT tensor: a klingjax LoRA factor (one layer of it), its diffusers key and the factor it is scaled by.

    `layout` is always LINEAR (klingjax (in, r) / (r, out) -> torch (r, in) / (out, r)); `scale` is alpha / rank
    for lora_b (folded into lora_B) and 1 for lora_a; `module` is the adapted layer's diffusers module name.
    """

    scale: float = 1.0
    module: str = ""


def _lora_layers(model: nnx.Module) -> list[tuple[tuple[str, ...], Dense]]:
    """(path, layer) of every `Dense` of `model` that carries LoRA factors (abstract or concrete model)."""
    return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_graph(model)
            if isinstance(m, Dense) and m.lora_a is not None]


def _module_names(cfg: DiTConfig) -> dict[tuple[tuple[str, ...], int | None], str]:
    """(kernel path, layer) -> diffusers module name, from the base model's export entries."""
    base = dataclasses.replace(cfg, lora=None)
    return {(e.path, e.layer): e.name.removesuffix(".weight") for e in dit_map.dit_entries(base)
            if e.path[-1] == "kernel" and e.layout is Layout.LINEAR}


def _entries(model: nnx.Module, cfg: DiTConfig) -> list[LoRAEntry]:
    names = _module_names(cfg)
    entries: list[LoRAEntry] = []
    for path, layer in _lora_layers(model):
        kernel_shape = tuple(layer.kernel.shape)
        stacked = len(kernel_shape) == 3  # the blocks' leading "layers" axis
        if len(kernel_shape) not in (2, 3):
            raise ValueError(f"LoRA layer {'/'.join(path)} has a kernel of shape {kernel_shape}; expected (in, out) "
                             "or (layers, in, out)")
        for i in range(kernel_shape[0]) if stacked else (None,):
            module = names.get((path + ("kernel",), i))
            if module is None:
                raise ValueError(f"LoRA layer {'/'.join(path)} (layer {i}) has no diffusers counterpart in "
                                 f"{dit_map.DIFFUSERS_CLASS}; drop it from the LoRA targets to export")
            for leaf, peft in FACTORS.items():
                shape = tuple(getattr(layer, leaf).shape)[1 if stacked else 0:]
                scale = float(layer.lora_scale) if leaf == "lora_b" else 1.0
                entries.append(LoRAEntry((*path, leaf), i, f"{PREFIX}.{module}.{peft}.weight", Layout.LINEAR, shape,
                                         scale=scale, module=module))
    check_unique(entries)
    return entries


def lora_entries(cfg: DiTConfig) -> list[LoRAEntry]:
    """One `LoRAEntry` per PEFT tensor of the LoRA of `cfg` (cfg.lora must be set): lora_A, lora_B per layer."""
    if cfg.lora is None:
        raise ValueError("DiTConfig.lora is None: the model has no LoRA factors to export")
    return _entries(dit_map.abstract_dit(cfg), cfg)


def lora_tensor(e: LoRAEntry, read: Reader, dtype: DTypeLike | None = None) -> np.ndarray:
    """One PEFT tensor in torch layout: `read`'s factor, times `e.scale` (computed in float32 or wider), as `dtype`
    (None: float32, or float64 for a float64 factor)."""
    x = np.asarray(read(e.path, e.layer))
    if tuple(x.shape) != e.shape:
        raise ValueError(f"{'.'.join(e.path)} (layer {e.layer}) read as shape {tuple(x.shape)}, expected {e.shape}")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    if e.scale != 1.0:
        x = x * x.dtype.type(e.scale)
    return to_torch(x, e.layout).astype(x.dtype if dtype is None else dtype, copy=False)


def lora_state_dict(cfg: DiTConfig, read: Reader, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """The PEFT/diffusers LoRA state dict (keys `transformer.<module>.lora_{A,B}.weight`, torch layout) of the
    LoRA factors that `read(path, layer)` returns (klingjax leaves, one layer of a stacked leaf)."""
    return {e.name: lora_tensor(e, read, dtype) for e in lora_entries(cfg)}


def lora_config(cfg: DiTConfig, entries: list[LoRAEntry] | None = None) -> dict:
    """The `lora_config.json` of `cfg`'s LoRA: rank, alpha, scale, klingjax targets, diffusers target modules."""
    entries = lora_entries(cfg) if entries is None else entries
    return {
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha or cfg.lora.rank,
        "scale": cfg.lora.scale,
        "scale_in_lora_B": True,  # lora_B holds B * alpha / rank: load with lora_alpha = rank (diffusers' default)
        "targets": list(cfg.lora.targets),
        "target_modules": sorted({e.module for e in entries}),
        "prefix": PREFIX,
        "weights": f"{LORA_WEIGHTS}.safetensors",
    }


def write_lora(folder: str, cfg: DiTConfig, read: Reader, dtype: DTypeLike = np.float32) -> dict:
    """Write `folder/pytorch_lora_weights.safetensors` (one tensor at a time) and `folder/lora_config.json`.

    read(path, layer): one klingjax LoRA factor (one layer of a stacked one). dtype: the tensors' dtype (e.g.
    np.float32, ml_dtypes.bfloat16). Returns {"tensors", "bytes", "target_modules"}.
    """
    dtype = np.dtype(dtype)
    entries = lora_entries(cfg)
    os.makedirs(folder, exist_ok=True)
    specs = [TensorSpec(e.name, e.torch_shape, dtype) for e in entries]
    writer = ShardedWriter(folder, LORA_WEIGHTS, specs, sys.maxsize)  # one file: diffusers reads no LoRA shards
    for e in entries:
        writer.write(e.name, lora_tensor(e, read, dtype))
    writer.close()
    config = lora_config(cfg, entries)
    with open(os.path.join(folder, LORA_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return {"tensors": len(specs), "bytes": sum(s.nbytes for s in specs),
            "target_modules": len(config["target_modules"])}


def model_reader(model: nnx.Module) -> Reader:
    """A `Reader` over the params of an in-memory (concrete) model."""
    params = dit_map.flat_params(model)
    return lambda path, layer: params[path] if layer is None else params[path][layer]


def lora_from_model(model: nnx.Module, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """The PEFT/diffusers LoRA state dict of an in-memory WanDiT (its own factors and scales, whatever its cfg.lora).

    For tests and small models; large checkpoints stream through `write_lora`.
    """
    read = model_reader(model)
    return {e.name: lora_tensor(e, read, dtype) for e in _entries(model, model.cfg)}
