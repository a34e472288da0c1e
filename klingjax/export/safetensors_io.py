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


MAX_HEADER_BYTES = 100 * 10**6  # real headers are a few MB; a larger length field is a corrupt or hostile file
MAX_INDEX_BYTES = 100 * 10**6


class SafetensorsError(ValueError):
    """A safetensors file (or index) that is inconsistent or malformed; the message names the file and tensor."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _check_entry(path: str, name: str, info, data_bytes: int) -> tuple[int, int]:
    """(begin, end) of one header entry after checking dtype, shape and offsets against the data section."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: entry must hold exactly dtype, shape, data_offsets, got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {dtype!r:.40} (known: {sorted(_DTYPES)})")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                               f"got {offsets!r:.80}")
    begin, end = offsets
    if end > data_bytes:
        raise SafetensorsError(f"{where}: data_offsets {offsets} run past the data section ({data_bytes} bytes)")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{where}: {dtype} {shape} needs {nbytes} bytes, data_offsets {offsets} hold "
                               f"{end - begin}")
    return begin, end


def _read_header(path: str) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, data start) of one file, validated before any tensor is read.

    Checked: the length field against the file size and MAX_HEADER_BYTES, the JSON (a dict, no duplicate
    keys), each entry's dtype, shape and offsets (inside the data section, the size its dtype and shape
    need) and that no two tensors overlap. Raises SafetensorsError naming the file (and tensor).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length field says {n} bytes, the file has {size - 8} after "
                                   f"it (limit {MAX_HEADER_BYTES}); corrupt or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ must be an object, got {type(metadata).__name__}")
    data_bytes = size - 8 - n
    spans = sorted((_check_entry(path, name, info, data_bytes), name) for name, info in header.items())
    reach, owner = 0, None  # the furthest end so far and its tensor
    for (begin, end), name in spans:
        if begin < reach and end > begin:  # empty tensors hold no bytes and may share an offset
            raise SafetensorsError(f"{path}: tensor {name!r} overlaps tensor {owner!r} in the data section")
        if end > reach:
            reach, owner = end, name
    return header, 8 + n


def _read_index(path: str, folder: str) -> dict[str, str]:
    """The weight map (tensor -> shard file name) of an index json; shard names must be plain names in `folder`."""
    if os.path.getsize(path) > MAX_INDEX_BYTES:
        raise SafetensorsError(f"{path}: {os.path.getsize(path)} bytes is larger than an index can be "
                               f"(limit {MAX_INDEX_BYTES})")
    try:
        with open(path, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8")).get("weight_map")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: not a safetensors index json ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{path}: weight_map must be a non-empty object of tensor name -> shard file")
    for name, file in weight_map.items():
        # A plain file name: no folders, no `..`, not absolute, so every shard lies in `folder` itself.
        if not (isinstance(file, str) and file.endswith(".safetensors") and file == os.path.basename(file)
                and not any(c in file for c in "/\\\0")):
            raise SafetensorsError(f"{path}: tensor {name!r} points at {file!r:.200}, not a .safetensors file "
                                   f"in {folder}")
    return weight_map


class SafetensorsFolder:
    """Lazy reader of a folder's `<prefix>.safetensors` (or its shards via the index json).

    Every header is validated when the folder is opened (see `_read_header`), before any tensor is read.
    """

    def __init__(self, folder: str, prefix: str):
        index = os.path.join(folder, f"{prefix}.safetensors.index.json")
        single = os.path.join(folder, f"{prefix}.safetensors")
        weight_map = None
        if os.path.isfile(index):
            weight_map = _read_index(index, folder)
            files = sorted(set(weight_map.values()))
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
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} lists shard {name}, which is missing")
            header, start = _read_header(path)
            for key, info in header.items():
                if key in self._where:
                    raise SafetensorsError(f"tensor {key!r} is in both {self._where[key][0]} and {path}")
                self._where[key] = (path, info, start)
        if weight_map is not None:
            wrong = [(k, f) for k, f in weight_map.items()
                     if k not in self._where or os.path.basename(self._where[k][0]) != f]
            if wrong:
                raise SafetensorsError(f"{index}: {len(wrong)} tensors are not in the shard it names, "
                                       f"e.g. {wrong[0][0]!r} -> {wrong[0][1]}")

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
            got = f.readinto(raw)
        if got != end - begin:  # the file shrank since its header was checked
            raise SafetensorsError(f"{path}: tensor {name!r}: read {got} of its {end - begin} bytes (truncated file)")
        return np.frombuffer(raw, dtype).reshape(info["shape"])
