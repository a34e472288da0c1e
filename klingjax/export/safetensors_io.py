"""Streaming safetensors: size-limited shards written one tensor at a time, and lazy per-tensor reads.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets),
then the raw bytes. All tensor shapes are known before any data is read (from the checkpoint metadata), so
each shard's header is written first and tensors are then appended as they stream in: host memory holds
one tensor at a time, never a shard. Shard and index names follow diffusers/transformers
(`<prefix>-00001-of-00003.safetensors` + `<prefix>.safetensors.index.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import sys
from collections.abc import Sequence

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
if sys.byteorder != "little":
    raise ImportError("klingjax.export writes little-endian safetensors and needs a little-endian host")
_CODES = {v: k for k, v in _DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "64MiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
    if m is None or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or 64MiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards if shards[0] else []


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for s in specs:
        header[s.name] = {"dtype": _CODES[np.dtype(s.dtype)], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes `specs` to `folder` as `<prefix>.safetensors` or numbered shards + index; `write` in spec order."""

    def __init__(self, folder: str, prefix: str, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.folder, self.prefix = folder, prefix
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"{prefix}.safetensors"] if n == 1 else [
            f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._shard_index = -1
        self._file = None

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; its name, shape and dtype must be the next planned spec."""
        shard, spec = self._order[self._next]
        if name != spec.name or tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise ValueError(f"expected {spec} next, got {name} {array.shape} {array.dtype}")
        if shard != self._shard_index:
            self._open(shard)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # no copy of the data
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard_index = shard
        self._file = open(os.path.join(self.folder, self.files[shard]), "wb")
        self._file.write(_header(self.shards[shard], {"format": "pt"}))

    def close(self) -> None:
        """Finish the last shard and write the index (sharded case); raises if tensors are missing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._order):
            missing = [s.name for _, s in self._order[self._next:]]
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[:3]}")
        if len(self.files) > 1:
            weight_map = {s.name: self.files[i] for i, s in self._order}
            total = sum(s.nbytes for _, s in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(self.folder, f"{self.prefix}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFolder:
    """Lazy reader of a folder's `<prefix>.safetensors` (or its shards via the index json)."""

    def __init__(self, folder: str, prefix: str):
        index = os.path.join(folder, f"{prefix}.safetensors.index.json")
        single = os.path.join(folder, f"{prefix}.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = [f"{prefix}.safetensors"]
        else:
            pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))] \
                if os.path.isdir(folder) else []
            hint = f" (found {pickles}: pickled weights are not read, convert them to safetensors)" if pickles else ""
            raise FileNotFoundError(f"no {prefix}.safetensors or {prefix}.safetensors.index.json in {folder}{hint}")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            header, start = _read_header(path)
            for key, info in header.items():
                self._where[key] = (path, info, start)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Read one tensor (only its bytes) as a numpy array in its stored dtype."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the safetensors files")
        path, info, start = self._where[name]
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = bytearray(end - begin)  # read straight into the array's buffer: one copy of the tensor in memory
        with open(path, "rb") as f:
            f.seek(start + begin)
            f.readinto(raw)
        return np.frombuffer(raw, dtype).reshape(info["shape"])
