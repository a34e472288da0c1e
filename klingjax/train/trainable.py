"""What a stage trains: every param, a frozen subset, or LoRA factors; and the base a fine-tune points at.

`trainable_filter(cfg)` is an NNX filter over model-relative param paths: the optimiser is built `wrt` it, gradients
are taken only for it (`nnx.DiffState`) and the EMA averages only it. Frozen params (`frozen_filter` on the
trainer's paths: model and EMA copies alike) are split out of the train state: the compiled step receives them as a
separate, non-donated argument, both the model and its EMA read the same buffers, and checkpoints hold only the rest
(trained params, their optimiser state and EMA, the step guard). Frozen params can be stored in bfloat16.

A fine-tune's stage directory holds `base.json`: the base checkpoint it started from (`init_from`, the step and
whether its EMA was read), a fingerprint of that checkpoint's files and the list of trained param paths. Resuming
checks the fingerprint; `checkpoint.restore_params` (generation, evaluation, export, `init_from`) reads the base
for the frozen params and this stage's checkpoint for the trained ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
from flax import nnx

from klingjax.config import ConfigError, TrainableConfig, TrainableMode

BASE_FILE = "base.json"
_SMALL_FILE = 1 << 20  # files up to this size (metadata, manifests) are hashed whole


def path_name(path: tuple) -> str:
    """A param path as the "/"-joined string patterns are matched against."""
    return "/".join(str(k) for k in path)


def trainable_filter(cfg: TrainableConfig):
    """NNX filter `(path, value) -> bool` selecting the trained params of a model (paths relative to the model)."""
    if cfg.mode is TrainableMode.FULL:
        return nnx.Param
    patterns = [re.compile(p) for p in cfg.params]

    def chosen(path: tuple, value: Any) -> bool:
        if cfg.mode is TrainableMode.LORA and isinstance(value, nnx.LoRAParam):
            return True
        return isinstance(value, nnx.Param) and any(p.search(path_name(path)) for p in patterns)

    return chosen


def frozen_filter(cfg: TrainableConfig, parts: tuple[str, ...] = ("model", "ema")):
    """NNX filter over trainer paths selecting the frozen params of `parts` (None when everything trains)."""
    if cfg.mode is TrainableMode.FULL:
        return None
    chosen = trainable_filter(cfg)

    def frozen(path: tuple, value: Any) -> bool:
        return bool(path) and path[0] in parts and isinstance(value, nnx.Param) and not chosen(path[1:], value)

    return frozen


def check_patterns(cfg: TrainableConfig, model: nnx.Module, where: str) -> list[str]:
    """The trained param paths of `model` (abstract is fine); ConfigError naming a `params` pattern matching nothing
    (`where`: the config key, e.g. "dit.trainable")."""
    params = nnx.state(model, nnx.Param)
    names = [path_name(p) for p, _ in nnx.to_flat_state(params)]
    for pattern in cfg.params:
        if not any(re.search(pattern, n) for n in names):
            raise ConfigError(f"config key '{where}.params': pattern {pattern!r} matches no parameter of the model "
                              f"(e.g. {names[:6]})")
    trained = [path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(cfg)))]
    if not trained:
        raise ConfigError(f"config key '{where}': nothing is trainable")
    return sorted(trained)


def frozen_dtype(cfg: TrainableConfig):
    return jax.numpy.dtype(cfg.frozen_dtype)


# ---------------------------------------------------------------------------------------------------------
# The base of a fine-tune
# ---------------------------------------------------------------------------------------------------------


def fingerprint(state_dir: str) -> str:
    """sha256 over a checkpoint's files: every relative path and size, and the contents of the small ones (Orbax
    metadata and OCDBT manifests, which name the content-addressed data files). Cheap for any model size."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(state_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            h.update(f"{os.path.relpath(path, state_dir)}:{size}\n".encode())
            if size <= _SMALL_FILE:
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def read_base(stage_dir: str) -> dict | None:
    """The `base.json` of a fine-tune's stage directory (None: a full-training stage)."""
    path = os.path.join(stage_dir, BASE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_base(stage_dir: str, info: dict) -> None:
    """Write `base.json` atomically (host 0 calls this)."""
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, BASE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


class BaseChangedError(ValueError):
    """The base checkpoint a fine-tune points at is missing or no longer the one it was trained on."""


def check_base(info: dict, stage_dir: str, state_dir: str) -> None:
    """Raise BaseChangedError if the base's files no longer match the fingerprint recorded in `base.json`."""
    if not os.path.isdir(state_dir):
        raise BaseChangedError(f"{stage_dir} fine-tunes {info['checkpoint']} (step {info['step']}), which is gone "
                               f"({state_dir} is missing)")
    got = fingerprint(state_dir)
    if got != info["sha256"]:
        raise BaseChangedError(
            f"{stage_dir} was trained on top of {state_dir} with fingerprint {info['sha256'][:12]}..., but those files "
            f"now have {got[:12]}...: the base changed, so the trained params no longer fit it")
