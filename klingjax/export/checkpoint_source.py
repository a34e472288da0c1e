"""Find the train loop's Orbax checkpoints and read them one parameter (or one layer) at a time.

Layout written by `klingjax.train`: `<workdir>/config.json` and `<workdir>/<stage>/checkpoints/<step>/state`,
with stage "vae" or "dit" and `state` = the Trainer's `{model, optimizer, ema}` in Orbax's OCDBT/zarr format.
Arrays are read straight from tensorstore by their Orbax key (`model.blocks.attn1.to_q.kernel.value`), with
tensorstore's cache disabled, so host memory holds one storage chunk and one output tensor at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from klingjax.config import ExperimentConfig, to_experiment

STAGES = ("dit", "vae")


class ArchitectureError(ValueError):
    """The checkpoint's parameters do not fit the model its config describes."""


@dataclasses.dataclass(frozen=True)
class StageCheckpoint:
    """One stage's checkpoint at one step."""

    stage: str  # "dit" | "vae"
    directory: str  # <workdir>/<stage>/checkpoints
    step: int

    @property
    def state_dir(self) -> str:
        return os.path.join(self.directory, str(self.step), "state")


def list_steps(directory: str) -> list[int]:
    """Finished checkpoint steps in an Orbax manager directory (temporary, half-written ones are skipped)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def _pick_step(stage: str, directory: str, step: int | None) -> StageCheckpoint:
    steps = list_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{stage}: no checkpoint for step {step} in {directory}; available steps: {steps}")
    return StageCheckpoint(stage, directory, step)


def find_checkpoints(path: str, step: int | None = None) -> tuple[str, list[StageCheckpoint]]:
    """(workdir, checkpoints) for a workdir, a stage dir, its `checkpoints/` dir or one step's dir.

    A workdir yields every stage it has (DiT first); `step` then selects the DiT's step, the VAE uses its latest.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        found = [s for s in STAGES if os.path.isdir(os.path.join(path, s, "checkpoints"))]
        if not found:
            raise FileNotFoundError(f"workdir {path} has no {' or '.join(STAGES)} checkpoints")
        picks = [_pick_step(s, os.path.join(path, s, "checkpoints"), step if s == "dit" else None) for s in found]
        return path, picks
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):  # one step's directory
        if step is not None and step != int(base):
            raise ValueError(f"--step {step} contradicts the step directory {path}")
        step, path = int(base), os.path.dirname(path)
        base = os.path.basename(path)
    if base != "checkpoints":
        path = os.path.join(path, "checkpoints")
    stage = os.path.basename(os.path.dirname(path))
    if stage not in STAGES:
        raise ValueError(f"cannot tell which model {path} holds: stage directories are named {STAGES}")
    workdir = os.path.dirname(os.path.dirname(path))
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir}/config.json is missing: the model architecture is read from it")
    return workdir, [_pick_step(stage, path, step)]


def load_experiment(workdir: str) -> ExperimentConfig:
    """The validated experiment config a workdir was trained with."""
    with open(os.path.join(workdir, "config.json")) as f:
        return to_experiment(json.load(f))


class OrbaxLeaves:
    """Shapes, dtypes and lazy reads of the arrays of one Orbax `state` directory."""

    def __init__(self, state_dir: str):
        meta_file = os.path.join(state_dir, "_METADATA")
        if not os.path.isfile(meta_file):
            raise FileNotFoundError(f"{state_dir} is not an Orbax PyTree checkpoint (no _METADATA)")
        with open(meta_file) as f:
            meta = json.load(f)
        self.state_dir = state_dir
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._ocdbt = bool(meta.get("use_ocdbt"))
        self.paths: list[tuple[str, ...]] = []
        for entry in meta["tree_metadata"].values():
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            self.paths.append(keys[:-1] if keys[-1] == "value" else keys)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._stores: dict[tuple[str, ...], ts.TensorStore] = {}

    def _key(self, path: tuple[str, ...]) -> str:
        return ".".join((*path, "value"))

    def _open(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._stores:
            if path not in set(self.paths):
                raise KeyError(f"checkpoint {self.state_dir} has no array {'.'.join(path)}")
            if self._ocdbt:
                kvstore = {"driver": "ocdbt", "base": f"file://{self.state_dir}", "path": self._key(path)}
            else:
                kvstore = {"driver": "file", "path": os.path.join(self.state_dir, self._key(path))}
            spec = {"driver": self._driver, "kvstore": kvstore}
            self._stores[path] = ts.open(spec, open=True, read=True, context=self._context).result()
        return self._stores[path]

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._open(path).shape)

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._open(path).dtype.numpy_dtype)

    def read(self, path: tuple[str, ...], layer: int | None = None, axes: tuple[int, ...] | None = None) -> np.ndarray:
        """The whole array, or its slice `layer` on the leading axis, optionally transposed by `axes`.

        The transpose is applied chunk by chunk into the output, so no second full-size copy is made.
        """
        store = self._open(path)
        if layer is not None:
            store = store[layer]
        # One storage chunk at a time: a single read of the whole box would fetch and decode every chunk it
        # touches concurrently (for a stacked leaf chunked across layers: the whole leaf).
        shape = tuple(store.shape)
        chunk = [c or n for c, n in zip(store.chunk_layout.read_chunk.shape or shape, shape)]
        axes = tuple(range(len(shape))) if axes is None else tuple(axes)
        out = np.empty(tuple(shape[a] for a in axes), store.dtype.numpy_dtype)
        for corner in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunk))):
            box = tuple(slice(b, min(b + c, n)) for b, c, n in zip(corner, chunk, shape))
            out[tuple(box[a] for a in axes)] = np.transpose(store[box].read().result(), axes)
            release_free_memory()
        return out


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps decoded chunks' pages in per-thread arenas otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas (call before tensorstore starts threads) so freed chunks are reused."""
    if _LIBC is not None:
        _LIBC.mallopt(-8, n)  # M_ARENA_MAX


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def check_architecture(leaves: OrbaxLeaves, prefix: str, model: nnx.Module, what: str) -> None:
    """Raise ArchitectureError unless `prefix.*` in the checkpoint has exactly the abstract model's arrays."""
    want = {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model))}
    have = {p[1:] for p in leaves.paths if p[:1] == (prefix,)}
    if not have:
        raise ArchitectureError(f"{leaves.state_dir} has no '{prefix}' subtree: not a klingjax train checkpoint")
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    wrong = [(p, leaves.shape((prefix, *p)), s) for p, s in sorted(want.items())
             if p in have and leaves.shape((prefix, *p)) != s]
    if missing or extra or wrong:
        lines = [f"the checkpoint {leaves.state_dir} does not hold the {what} its config describes:"]
        lines += [f"  missing {'.'.join(p)}" for p in missing[:5]]
        lines += [f"  unexpected {'.'.join(p)}" for p in extra[:5]]
        lines += [f"  {'.'.join(p)}: checkpoint {a}, config {b}" for p, a, b in wrong[:5]]
        raise ArchitectureError("\n".join(lines))


def load_model(leaves: OrbaxLeaves, prefix: str, model: nnx.Module) -> nnx.Module:
    """Fill an abstract model with the checkpoint's `prefix` ("model" or "ema") arrays (whole model in memory)."""
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(leaves.read((prefix, *(str(p) for p in path)))))
    return nnx.merge(graphdef, state)
