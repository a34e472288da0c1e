"""Grain input pipeline over ArrayRecord shards: per-host shard -> shuffle -> repeat -> decode -> batch.

    plain:    records -> decode (VideoDecoder: target fps, window, resize + crop) -> skip failures -> batch
    buckets:  records -> metadata peek -> bucket ticket -> skip failures -> group indices per bucket
              -> decode the group -> batch of one shape            (design: klingjax/data/buckets.py)
    both:     [-> tokenize captions] [-> mp_prefetch workers]

Randomness (window start, crop, caption dropout, image-or-video) is drawn per example from
`example_rng(seed, host, stream index, purpose)`, so it is reproducible and survives resume.

Records that fail to decode (corrupt bytes, undecodable video, clips shorter than requested, videos
whose record or header declares a size past `VideoDecoder.limits`, refused before decoding) are
skipped, not fatal. The map stage turns a failure into a `DecodeFailure` marker; a small filter stage
after it drops markers and keeps a running count *in the iterator state* (key `"decode_failures"`),
so the count is checkpointed and restored with the iterator, and also survives `mp_prefetch` (each
worker's state holds its own count). Read it with `num_decode_failures(iterator)`. Like the rest of the
state it describes the stream up to the last batch handed out: with workers, failures a worker hit
after its last delivered batch are not reported. With buckets, the peek validates each record (and
probes mp4 headers) before grouping; a record that still fails later is counted and its batch slot is
filled with a copy of another clip of the same batch, so every batch keeps its full shape.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags, logging
from grain.multiprocessing import SharedMemoryArray

from klingjax.data.buckets import Bucket, BucketGroupIterDataset, BucketSpec, Ticket, assign_bucket
from klingjax.data.records import decode_record
from klingjax.data.sampling import (
    RNG_BUCKET,
    RNG_CAPTION,
    RNG_DECODE,
    VideoDecoder,
    decode_video_record,
    drop_caption,
    example_rng,
    video_metadata,
)
from klingjax.data.video_io import DEFAULT_LIMITS, VideoLimits

__all__ = ["DecodeFailure", "SkipFailuresIterDataset", "DecodeGroupsIterDataset", "VideoDecoder",
           "decode_video_record", "make_dataset", "num_decode_failures", "stack_batch"]

FAILURE_STATE_KEY = "decode_failures"
_MIN_SHARED_BYTES = 1 << 16  # smaller arrays are cheaper to pickle than to map


class DecodeFailure(NamedTuple):
    """Marker emitted by the decode stage in place of a record that could not be decoded."""

    error: str
    counted: bool = True  # False on hosts that see a record only to bucket it (one host counts each failure)


# ---------------------------------------------------------------------------------------------------
# Per-example maps (run in Grain's read threads or worker processes)
# ---------------------------------------------------------------------------------------------------


class _ExampleDecoder:
    """Picklable (stream index, record bytes[, bucket]) -> element; any failure becomes a DecodeFailure."""

    def __init__(self, decode: Callable, *, seed: int, host: int, caption_dropout: float):
        self._decode, self._seed, self._host, self._caption_dropout = decode, seed, host, caption_dropout
        drop_caption("", caption_dropout, np.random.default_rng(0))  # validates the probability

    def __call__(self, index: int, raw: bytes, bucket: Bucket | None = None):
        try:
            record = decode_record(raw)
            if isinstance(self._decode, grain.transforms.RandomMap):
                decode = self._decode.with_shape(bucket) if bucket is not None else self._decode
                element = decode.random_map(record, example_rng(self._seed, self._host, index, RNG_DECODE))
            else:
                element = self._decode(record)
        except Exception as e:  # noqa: BLE001 - one bad record must not stop training
            logging.log_every_n_seconds(logging.WARNING, "skipping undecodable record: %r", 10, e)
            return DecodeFailure(error=repr(e))
        if self._caption_dropout > 0:
            if "caption" not in element:
                raise KeyError("caption_dropout needs `decode` to return a 'caption'")
            rng = example_rng(self._seed, self._host, index, RNG_CAPTION)
            element["caption"] = drop_caption(element["caption"], self._caption_dropout, rng)
        return element


def _counts_failure(process_index: int, process_count: int, index: int) -> bool:
    """Whether this host counts a failure at stream position `index` (hosts sharing a stream take turns)."""
    return index % process_count == process_index


class _Peek:
    """Picklable (stream index, record bytes) -> Ticket from the metadata alone (or a DecodeFailure)."""

    def __init__(self, spec: BucketSpec, target_fps: float | None, *, seed: int, host: int,
                 counts: Callable[[int], bool], limits: VideoLimits = DEFAULT_LIMITS):
        self._spec, self._target_fps, self._seed, self._host, self._counts = spec, target_fps, seed, host, counts
        self._limits = limits

    def __call__(self, index: int, raw: bytes):
        try:
            frames, height, width, fps = video_metadata(decode_record(raw), limits=self._limits)
            rng = example_rng(self._seed, self._host, index, RNG_BUCKET)
            return Ticket(index, assign_bucket(self._spec, height=height, width=width, num_frames=frames, fps=fps,
                                               target_fps=self._target_fps, rng=rng))
        except Exception as e:  # noqa: BLE001
            logging.log_every_n_seconds(logging.WARNING, "skipping unusable record: %r", 10, e)
            return DecodeFailure(error=repr(e), counted=self._counts(index))


# ---------------------------------------------------------------------------------------------------
# Stages whose iterator state carries failure counts
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
            self._failures += element.counted

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


class _DecodeGroupsIterator(grain.DatasetIterator):
    """Ticket groups -> batches: reads this host's slice of each group by index and decodes it in threads.

    While one batch is handed out, the next group is already decoding (read-ahead); the state stays the
    one after the last batch handed out.
    """

    def __init__(self, parent: grain.DatasetIterator, owner: DecodeGroupsIterDataset):
        super().__init__(parent)
        self._owner = owner
        self._failures = 0
        self._last_good: dict[Bucket, Any] = {}  # filler when a whole slice fails (not checkpointed)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, owner.num_threads), thread_name_prefix="decode")
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._ahead = None  # (parent state before the group, (tickets, futures) or None at the end)

    def _load(self, ticket: Ticket):
        return self._owner.decode(ticket.index, self._owner.stream[ticket.index], Bucket(*ticket.bucket))

    def _submit(self):
        """Pull the next group holding part of this host's slice and start decoding that part."""
        state = copy.deepcopy(self._parent.get_state())
        while True:
            try:
                group = next(self._parent)
            except StopIteration:
                return state, None
            if mine := group[self._owner.slice_start:self._owner.slice_stop]:  # empty: a short final group
                return state, (mine, [self._pool.submit(self._load, t) for t in mine])

    def __next__(self):
        while True:
            if self._ahead is None:
                self._ahead = self._submit()
            job = self._ahead[1]
            if job is None:
                raise StopIteration
            tickets, futures = job
            elements = [f.result() for f in futures]
            self._ahead = self._submit()
            good = [e for e in elements if not isinstance(e, DecodeFailure)]
            bucket = Bucket(*tickets[0].bucket)
            self._failures += len(elements) - len(good)
            if good:
                self._last_good[bucket] = good[-1]
            elif bucket in self._last_good:
                good = [self._last_good[bucket]]
            else:
                logging.error("every clip of a %s batch failed to decode; skipping the batch", bucket)
                continue
            filler = iter(good * len(elements))
            elements = [next(filler) if isinstance(e, DecodeFailure) else e for e in elements]
            return stack_batch(elements, shared_memory=self._owner.shared_memory)

    def get_state(self) -> dict[str, Any]:
        parent = self._ahead[0] if self._ahead is not None else self._parent.get_state()
        return {"parent": copy.deepcopy(parent), FAILURE_STATE_KEY: self._failures}

    def set_state(self, state: dict[str, Any]) -> None:
        if self._ahead is not None and self._ahead[1] is not None:
            for future in self._ahead[1][1]:
                future.cancel()
        self._ahead = None
        self._parent.set_state(state["parent"])
        self._failures = int(state[FAILURE_STATE_KEY])


class DecodeGroupsIterDataset(grain.IterDataset):
    """IterDataset stage: groups of Tickets -> stacked batches, decoding `stream[index]` for this host's slice.

    `stream` (the shuffled, repeated record MapDataset) is held apart from the parents, so Grain's
    worker slicing never touches it: indices are positions in the full stream.
    """

    def __init__(self, parent: grain.IterDataset, *, stream: grain.MapDataset, decode: _ExampleDecoder,
                 slice_start: int, slice_stop: int, num_threads: int, shared_memory: bool):
        super().__init__(parent)
        self.stream, self.decode, self.num_threads, self.shared_memory = stream, decode, num_threads, shared_memory
        self.slice_start, self.slice_stop = slice_start, slice_stop

    def __iter__(self) -> _DecodeGroupsIterator:
        return _DecodeGroupsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"DecodeGroupsIterDataset(slice={self.slice_start}:{self.slice_stop})"


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
# Batching, tokenization and the dataset chain
# ---------------------------------------------------------------------------------------------------


def stack_batch(elements: Sequence[Any], *, shared_memory: bool = False) -> Any:
    """Stack a list of (nested dict) elements: arrays/numbers -> np.stack, strings -> np.ndarray of str.

    With `shared_memory`, large arrays are stacked straight into shared memory, which Grain's worker
    processes hand to the main process without copying them again.
    """
    first = elements[0]
    if isinstance(first, Mapping):
        return {k: stack_batch([e[k] for e in elements], shared_memory=shared_memory) for k in first}
    if isinstance(first, str):
        return np.asarray(elements, dtype=np.str_)  # (B,)
    if isinstance(first, np.ndarray | np.generic | int | float | bool):
        arrays = [np.asarray(e) for e in elements]
        if not shared_memory or arrays[0].nbytes * len(arrays) < _MIN_SHARED_BYTES:
            return np.stack(arrays)  # (B, ...)
        return np.stack(arrays, out=SharedMemoryArray((len(arrays), *arrays[0].shape), arrays[0].dtype))
    return list(elements)


class _Tokenize:
    """Picklable batch map: adds "text_ids" (B, L) and "text_mask" (B, L) from the batch's captions."""

    def __init__(self, tokenize: Callable[[list[str]], tuple[Any, Any]]):
        self._tokenize = tokenize

    def __call__(self, batch: dict) -> dict:
        if "caption" not in batch:
            raise KeyError("tokenize needs `decode` to return a 'caption'")
        captions = [str(c) for c in batch["caption"]]
        ids, mask = (np.asarray(a) for a in self._tokenize(captions))
        if ids.shape != mask.shape or ids.shape[:1] != (len(captions),):
            raise ValueError(f"tokenize returned ids {ids.shape} / mask {mask.shape} for {len(captions)} captions")
        return {**batch, "text_ids": ids, "text_mask": mask}


def make_dataset(
    paths: Sequence[str],
    *,
    decode: Callable[[dict], dict] | grain.transforms.RandomMap,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_options: grain.ReadOptions | None = None,
    buckets: BucketSpec | None = None,
    caption_dropout: float = 0.0,
    tokenize: Callable[[list[str]], tuple[Any, Any]] | None = None,
    source: Sequence[bytes] | None = None,
) -> grain.IterDataset:
    """Batched, checkpointable dataset over ArrayRecord `paths` for host `process_index` of `process_count`.

    `decode` maps a decoded record dict to an element dict; a `grain.transforms.RandomMap` (e.g.
    `VideoDecoder`) also gets the example's rng. `num_epochs=None` repeats forever with a new shuffle
    order per epoch. With `buckets` (needs a `VideoDecoder`) batches hold one (frames, height, width)
    bucket each. `caption_dropout` blanks captions with that probability; `tokenize(captions) -> (ids,
    mask)` adds "text_ids"/"text_mask" per batch. With `worker_count > 0`, the work after reading runs
    in that many processes (`decode` and `tokenize` must then be picklable). `source` (random-access
    record bytes, e.g. a Grain data source over a TFDS split) replaces the ArrayRecord `paths`.
    """
    if source is None and not paths:
        raise ValueError("make_dataset got no shard paths")
    if buckets is not None and not isinstance(decode, VideoDecoder):
        raise TypeError(f"buckets need decode=VideoDecoder(...) to set each batch's shape, got {decode!r}")
    global_groups = buckets is not None and buckets.same_shape_across_hosts and process_count > 1
    host = 0 if global_groups else process_index  # hosts sharing one stream must draw the same values
    stream = grain.MapDataset.source(source if source is not None else grain.sources.ArrayRecordDataSource(list(paths)))
    if not global_groups:
        stream = stream[process_index::process_count]
    if shuffle:
        stream = stream.shuffle(seed=seed)
    if num_epochs != 1:
        stream = stream.repeat(num_epochs)  # reseeds the shuffle every epoch
    example = _ExampleDecoder(decode, seed=seed, host=host, caption_dropout=caption_dropout)
    # Keep the read-ahead small: each buffered element is a decoded clip.
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(2 * batch_size, 4))
    if buckets is None:
        it_ds = SkipFailuresIterDataset(stream.map_with_index(example).to_iter_dataset(read_options))
        batch_fn = functools.partial(stack_batch, shared_memory=worker_count > 0)
        it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    else:
        counts = functools.partial(_counts_failure, *((process_index, process_count) if global_groups else (0, 1)))
        peek = _Peek(buckets, decode.target_fps, seed=seed, host=host, counts=counts, limits=decode.limits)
        tickets = SkipFailuresIterDataset(stream.map_with_index(peek).to_iter_dataset(read_options))
        hosts = process_count if global_groups else 1
        groups = BucketGroupIterDataset(tickets, group_size=batch_size * hosts, drop_remainder=drop_remainder)
        start = process_index * batch_size if global_groups else 0
        it_ds = DecodeGroupsIterDataset(groups, stream=stream, decode=example, slice_start=start,
                                        slice_stop=start + batch_size, num_threads=read_options.num_threads,
                                        shared_memory=worker_count > 0)
    if tokenize is not None:
        it_ds = it_ds.map(_Tokenize(tokenize))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; outside an absl app use defaults
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds
