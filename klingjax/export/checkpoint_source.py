"""Find the train loop's Orbax checkpoints and read them one parameter (or one layer) at a time.

Layout written by `klingjax.train`: `<workdir>/config.json` and `<workdir>/<stage>/checkpoints/<step>/state`,
with stage "vae" or "dit" and `state` = the Trainer's `{model, optimizer, ema}` in Orbax's OCDBT/zarr format.
Arrays are read straight from tensorstore by their Orbax key (`model.blocks.attn1.to_q.kernel.value`), with
tensorstore's cache disabled, so host memory holds one storage chunk and one output tensor at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from klingjax.train.checkpoint import (  # noqa: F401  (re-exported: the export side reads them from here)
    STAGES,
    ArchitectureError,
    CorruptCheckpointError,
    StageCheckpoint,
    describe_error,
    find_checkpoints,
    list_steps,
)


class OrbaxLeaves:
    """Shapes, dtypes and lazy reads of the arrays of one Orbax `state` directory."""

    def __init__(self, state_dir: str):
        meta_file = os.path.join(state_dir, "_METADATA")
        if not os.path.isfile(meta_file):
            raise FileNotFoundError(f"{state_dir} is not an Orbax PyTree checkpoint (no _METADATA)")
        self.state_dir = state_dir
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except ValueError as e:
            raise self._corrupt("_METADATA", e) from None
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
            try:
                self._stores[path] = ts.open(spec, open=True, read=True, context=self._context).result()
            except Exception as e:  # noqa: BLE001 - TensorStore reports unreadable files as a bare Exception
                raise self._corrupt(self._key(path), e) from None
        return self._stores[path]

    def _corrupt(self, what: str, e: BaseException) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {self.state_dir} is unreadable: reading {what}: "
                                      f"{describe_error(e)}. It is truncated, corrupt or was not completely written; "
                                      "choose another step with --step")

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
            try:
                block = store[box].read().result()
            except Exception as e:  # noqa: BLE001
                raise self._corrupt(self._key(path), e) from None
            out[tuple(box[a] for a in axes)] = np.transpose(block, axes)
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
