"""Record (de)serialisation with msgpack and ArrayRecord shard writing / listing.

A record is a dict of str, int, float, bool, None, bytes, lists, nested dicts and numpy arrays. Arrays
travel as a msgpack ext type carrying (dtype, shape, raw bytes), numpy scalars as a second ext type, so
`decode_record(encode_record(d))` returns equal values with equal dtypes (tuples come back as lists;
np.float64 scalars, being Python floats, come back as float).

Video records (synthetic and real data) use the keys in `VIDEO_KEYS`: `video` is uint8 (T, H, W, 3)
when `codec == "raw"` or the bytes of an encoded file when `codec == "mp4"`. Other record kinds
(e.g. cached latents) use their own keys; nothing here depends on them.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable

import msgpack
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter

VIDEO_KEYS = ("video", "codec", "caption", "fps", "num_frames", "height", "width", "meta")
SHARD_SUFFIX = ".array_record"
_EXT_ARRAY = 1
_EXT_SCALAR = 2
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheapest random access for Grain


def _pack_array(x: np.ndarray) -> bytes:
    if x.dtype.hasobject:
        raise TypeError(f"cannot serialise numpy arrays of dtype {x.dtype}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # (ascontiguousarray alone would turn 0-d into 1-d)
    return msgpack.packb([x.dtype.str, list(x.shape), x.tobytes()], use_bin_type=True)


def _default(obj):
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(_EXT_ARRAY, _pack_array(obj))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_SCALAR, _pack_array(np.asarray(obj)))
    raise TypeError(f"cannot serialise {type(obj).__name__} in a record")


def _ext_hook(code: int, data: bytes):
    if code not in (_EXT_ARRAY, _EXT_SCALAR):
        return msgpack.ExtType(code, data)
    dtype, shape, raw = msgpack.unpackb(data, raw=False)
    array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(tuple(shape)).copy()  # copy: writable, owns memory
    return array[()] if code == _EXT_SCALAR else array


def encode_record(d: dict) -> bytes:
    """Serialise a record dict (numpy arrays included) to msgpack bytes."""
    return msgpack.packb(d, default=_default, use_bin_type=True, strict_types=False)


def decode_record(b: bytes) -> dict:
    """Inverse of `encode_record`; raises ValueError on bytes that are not a record."""
    try:
        record = msgpack.unpackb(b, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise ValueError(f"corrupt record ({len(b)} bytes): {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, expected a dict")
    return record


def make_video_record(video, *, codec: str, caption: str, fps: float, num_frames: int, height: int,
                      width: int, meta: dict | None = None) -> dict:
    """A video record with the standard keys; `video` is uint8 (T, H, W, 3) for "raw", file bytes for "mp4"."""
    if codec == "raw":
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.shape != (num_frames, height, width, 3):
            raise ValueError(f"raw video must be uint8 {(num_frames, height, width, 3)}, got "
                             f"{video.dtype} {video.shape}")
    elif codec == "mp4":
        if not isinstance(video, bytes):
            raise TypeError(f"mp4 video must be bytes, got {type(video).__name__}")
    else:
        raise ValueError(f"unknown codec {codec!r}; expected 'raw' or 'mp4'")
    return {"video": video, "codec": codec, "caption": caption, "fps": fps, "num_frames": int(num_frames),
            "height": int(height), "width": int(width), "meta": dict(meta or {})}


def shard_path(out_dir: str, prefix: str, index: int, num_shards: int) -> str:
    """Final path of shard `index` of `num_shards`: DIR/PREFIX-00000-of-00004.array_record."""
    return os.path.join(out_dir, f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}")


def write_shards(records: Iterable[dict], out_dir: str, prefix: str, num_shards: int, *, shard_offset: int = 0,
                 total_shards: int | None = None) -> list[str]:
    """Write records round-robin into `num_shards` ArrayRecord files; returns their paths.

    Several writers (e.g. one per process) can fill one shard set: writer k passes
    `shard_offset=k * num_shards` and `total_shards=K * num_shards`.

    Each shard is written under a temporary name and renamed only after every shard closed cleanly,
    so an interrupted run never leaves a file that `list_shards` would pick up.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(out_dir, exist_ok=True)
    total = num_shards if total_shards is None else total_shards
    if shard_offset < 0 or shard_offset + num_shards > total:
        raise ValueError(f"shards {shard_offset}..{shard_offset + num_shards - 1} do not fit in {total}")
    paths = [shard_path(out_dir, prefix, shard_offset + i, total) for i in range(num_shards)]
    tmp_paths = [f"{p}.tmp-{os.getpid()}" for p in paths]
    writers = [ArrayRecordWriter(p, _WRITER_OPTIONS) for p in tmp_paths]
    count = 0
    try:
        for i, record in enumerate(records):
            writers[i % num_shards].write(encode_record(record))
            count += 1
        for w in writers:
            w.close()
        writers = []
        for tmp, final in zip(tmp_paths, paths):
            os.replace(tmp, final)
    except BaseException:
        for w in writers:
            w.close()
        for tmp in tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    logging.info("wrote %d records to %d shards %s", count, num_shards, os.path.join(out_dir, prefix + "-*"))
    return paths


def list_shards(directory: str, prefix: str) -> list[str]:
    """Sorted paths of the complete shards DIR/PREFIX-*-of-*.array_record."""
    pattern = re.compile(re.escape(prefix) + r"-\d{5,}-of-\d{5,}" + re.escape(SHARD_SUFFIX))
    candidates = glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(prefix)}-*{SHARD_SUFFIX}"))
    return sorted(p for p in candidates if pattern.fullmatch(os.path.basename(p)))
