"""Grain input pipeline over ArrayRecord shards: per-host shard -> shuffle -> repeat -> decode -> batch.

Records that fail to decode (corrupt bytes, undecodable video, clips shorter than requested) are
skipped, not fatal. The map stage turns a failure into a `DecodeFailure` marker; a small filter stage
after it drops markers and keeps a running count *in the iterator state* (key `"decode_failures"`),
so the count is checkpointed and restored with the iterator, and also survives `mp_prefetch` (each
worker's state holds its own count). Read it with `num_decode_failures(iterator)`. Like the rest of the
state it describes the stream up to the last batch handed out: with workers, failures a worker hit
after its last delivered batch are not reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from klingjax.data.records import decode_record
from klingjax.data.video_io import decode_video

FAILURE_STATE_KEY = "decode_failures"


class DecodeFailure(NamedTuple):
    """Marker emitted by the decode stage in place of a record that could not be decoded."""

    error: str


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def _resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 so it covers (height, width), then centre-crop to exactly that."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((t, height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR, reducing_gap=2.0))
        out[i] = resized[top:top + height, left:left + width]
    return out


def decode_video_record(record: Mapping[str, Any], *, num_frames: int, height: int, width: int) -> dict:
    """Video record -> {"video": float32 (T, H, W, 3) in [-1, 1], "caption": str, "meta_json": str}.

    Longer clips are centre-cropped in time; other spatial sizes are resized to cover and centre-cropped.
    Raises ValueError for clips shorter than `num_frames` (the pipeline then skips and counts them).
    """
    codec = record["codec"]
    if codec == "raw":
        frames = np.asarray(record["video"])
    elif codec == "mp4":
        frames = decode_video(record["video"])
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if codec == "mp4":
        # Encoders pad odd sizes to even ones; drop the padding the record's header says is not content.
        frames = frames[:, : record.get("height", frames.shape[1]), : record.get("width", frames.shape[2])]
    if frames.shape[0] < num_frames:
        raise ValueError(f"clip has {frames.shape[0]} frames, {num_frames} needed")
    start = (frames.shape[0] - num_frames) // 2
    frames = _resize_crop(frames[start:start + num_frames], height, width)  # (T, H, W, 3)
    return {
        "video": frames.astype(np.float32) / 127.5 - 1.0,
        "caption": str(record["caption"]),
        "meta_json": json.dumps(record.get("meta", {}), sort_keys=True),
    }


class _SafeDecode:
    """Picklable map fn: bytes -> decode_record -> user decode; any exception becomes a DecodeFailure."""

    def __init__(self, decode: Callable[[dict], dict]):
        self._decode = decode

    def __call__(self, raw: bytes):
        try:
            return self._decode(decode_record(raw))
        except Exception as e:  # noqa: BLE001 - one bad record must not stop training
            logging.log_every_n_seconds(logging.WARNING, "skipping undecodable record: %r", 10, e)
            return DecodeFailure(error=repr(e))


# ---------------------------------------------------------------------------------------------------
# The failure-skipping stage (a Grain IterDataset whose iterator state carries the count)
# ---------------------------------------------------------------------------------------------------


class _SkipFailuresIterator(grain.DatasetIterator):
    """Drops DecodeFailure markers and counts them in its checkpointable state."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._failures = 0

    def __next__(self):
        while True:
            element = next(self._parent)
            if not isinstance(element, DecodeFailure):
                return element
            self._failures += 1

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), FAILURE_STATE_KEY: self._failures}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._failures = int(state[FAILURE_STATE_KEY])


class SkipFailuresIterDataset(grain.IterDataset):
    """IterDataset stage that skips DecodeFailure elements; see `num_decode_failures`."""

    def __iter__(self) -> _SkipFailuresIterator:
        return _SkipFailuresIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "SkipFailuresIterDataset"


def num_decode_failures(iterator_or_state: grain.DatasetIterator | Mapping | Sequence) -> int:
    """Records skipped so far by this pipeline (summed over mp_prefetch workers), from an iterator or its state."""
    state = iterator_or_state
    if isinstance(state, grain.DatasetIterator):
        state = state.get_state()
    if isinstance(state, Mapping):
        own = int(state.get(FAILURE_STATE_KEY, 0))
        return own + sum(num_decode_failures(v) for k, v in state.items() if k != FAILURE_STATE_KEY)
    if isinstance(state, list | tuple):
        return sum(num_decode_failures(v) for v in state)
    return 0


# ---------------------------------------------------------------------------------------------------
# Batching and the dataset chain
# ---------------------------------------------------------------------------------------------------


def stack_batch(elements: Sequence[Any]) -> Any:
    """Stack a list of (nested dict) elements: arrays/numbers -> np.stack, strings -> np.ndarray of str."""
    first = elements[0]
    if isinstance(first, Mapping):
        return {k: stack_batch([e[k] for e in elements]) for k in first}
    if isinstance(first, str):
        return np.asarray(elements, dtype=np.str_)  # (B,)
    if isinstance(first, np.ndarray | np.generic | int | float | bool):
        return np.stack([np.asarray(e) for e in elements])  # (B, ...)
    return list(elements)


def make_dataset(
    paths: Sequence[str],
    *,
    decode: Callable[[dict], dict],
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Batched, checkpointable dataset over ArrayRecord `paths` for host `process_index` of `process_count`.

    `decode` maps a decoded record dict to an element dict; `num_epochs=None` repeats forever with a new
    shuffle order per epoch. With `worker_count > 0`, decoding and batching run in that many processes.
    """
    if not paths:
        raise ValueError("make_dataset got no shard paths")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(paths)))
    ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
    ds = ds.map(_SafeDecode(decode))
    # Keep the read-ahead small: each buffered element is a decoded clip.
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(2 * batch_size, 4))
    it_ds = SkipFailuresIterDataset(ds.to_iter_dataset(read_options))
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack_batch)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; outside an absl app use defaults
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds
