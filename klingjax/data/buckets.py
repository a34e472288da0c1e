"""Aspect-ratio and duration buckets: every batch holds clips of one (frames, height, width) shape.

Design. A clip's bucket is a pure function of its record metadata (height, width, frame count, fps),
the target fps and, for joint image+video training, one per-example random draw; all of that is known
before any frame is decoded. So the grouping stage (`BucketGroupIterDataset`) groups *stream indices*,
never decoded frames: it keeps one list of pending indices per bucket and emits a group when a list
fills. Its checkpoint state is the parent's state plus those pending index lists (small JSON), and
the next stage decodes a group by random access to the record stream. Restoring re-reads the pending
records by index, and since every random choice is derived from (seed, index), the resumed run emits
exactly the batches the uninterrupted one would have.

Buckets:
  * aspect: the named ratio nearest in log(w / h) (ASPECT_RATIOS);
  * resolution: per base, every aspect has about the area of a base x 16:9 frame with sides a multiple
    of 16 (RESOLUTION_BUCKETS); a clip takes the largest base it fills without upscaling, else the smallest;
  * duration: the longest frame count in `durations` (1 + 4k, so the causal VAE maps it to 1 + k latent
    frames) that the clip yields at the target fps. 1 is the image bucket: single-frame records land
    there, and with `image_prob` a video is used as a single random frame with that probability.

    RESOLUTION_BUCKETS = {256: {16:9 (256, 448), 9:16 (448, 256), 1:1 (336, 336)},
                          480: {16:9 (480, 848), 9:16 (848, 480), 1:1 (640, 640)},
                          720: {16:9 (720, 1280), 9:16 (1280, 720), 1:1 (960, 960)}}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import grain
import numpy as np

from klingjax.data.sampling import max_frames_at_fps

ASPECT_RATIOS = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4)}  # name -> (w, h)
DURATION_BUCKETS = (1, 17, 33, 49)
DEFAULT_ASPECTS = ("16:9", "9:16", "1:1")


def _round16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def bucket_resolution(base: int, aspect: str) -> tuple[int, int]:
    """(H, W) of `aspect` at resolution `base`: about the area of a base x 16:9 frame, sides multiples of 16."""
    if base < 16 or base % 16:
        raise ValueError(f"resolution base must be a positive multiple of 16, got {base}")
    if aspect not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect {aspect!r}; choose from {sorted(ASPECT_RATIOS)}")
    area = base * _round16(base * 16 / 9)
    aw, ah = ASPECT_RATIOS[aspect]
    return _round16(math.sqrt(area * ah / aw)), _round16(math.sqrt(area * aw / ah))


RESOLUTION_BUCKETS = {base: {a: bucket_resolution(base, a) for a in DEFAULT_ASPECTS} for base in (256, 480, 720)}


class Bucket(NamedTuple):
    """One batch shape: frames, height, width."""

    num_frames: int
    height: int
    width: int


class Ticket(NamedTuple):
    """A record's position in the (shuffled, repeated) record stream and the bucket it belongs to."""

    index: int
    bucket: Bucket


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """The bucket table: resolution bases, aspect names, duration buckets, image sampling, host alignment.

    With `same_shape_across_hosts` (the default, needed to assemble global arrays) every host reads the
    whole record stream's metadata, groups global batches identically and decodes only its slice of each,
    so all hosts emit the same shape at every step. Otherwise records are split between hosts first and
    each host buckets its own share (no extra reads; shapes may differ between hosts at a step).
    """

    bases: tuple[int, ...] = (256,)
    aspects: tuple[str, ...] = DEFAULT_ASPECTS
    durations: tuple[int, ...] = DURATION_BUCKETS
    image_prob: float = 0.0
    same_shape_across_hosts: bool = True

    def __post_init__(self):
        if not self.bases or not self.aspects or not self.durations:
            raise ValueError(f"BucketSpec needs bases, aspects and durations, got {self}")
        for base in self.bases:
            bucket_resolution(base, self.aspects[0])  # validates the base
        if unknown := [a for a in self.aspects if a not in ASPECT_RATIOS]:
            raise ValueError(f"unknown aspects {unknown}; choose from {sorted(ASPECT_RATIOS)}")
        if bad := [d for d in self.durations if d < 1 or (d - 1) % 4]:
            raise ValueError(f"duration buckets must be 1 + 4k frames, got {bad}")
        if not 0.0 <= self.image_prob <= 1.0:
            raise ValueError(f"image_prob must be in [0, 1], got {self.image_prob}")
        if self.image_prob > 0 and 1 not in self.durations:
            raise ValueError("image_prob > 0 needs the 1-frame (image) duration bucket in `durations`")

    def buckets(self) -> list[Bucket]:
        """Every bucket of the table."""
        return [Bucket(t, *bucket_resolution(b, a)) for b in self.bases for a in self.aspects for t in self.durations]


def nearest_aspect(height: int, width: int, aspects: tuple[str, ...] = DEFAULT_ASPECTS) -> str:
    """The aspect name nearest to width / height in log ratio."""
    if height < 1 or width < 1:
        raise ValueError(f"bad frame size {height}x{width}")
    ratio = math.log(width / height)
    return min(aspects, key=lambda a: abs(ratio - math.log(ASPECT_RATIOS[a][0] / ASPECT_RATIOS[a][1])))


def assign_bucket(spec: BucketSpec, *, height: int, width: int, num_frames: int, fps: float | None,
                  target_fps: float | None, rng: np.random.Generator | None = None) -> Bucket:
    """The bucket of a clip from its metadata; raises ValueError when the clip is too short for every duration.

    `rng` is drawn exactly once (the image/video choice when `spec.image_prob > 0`); without it no video
    is turned into an image.
    """
    aspect = nearest_aspect(height, width, spec.aspects)
    sizes = sorted((bucket_resolution(b, aspect) for b in spec.bases), key=lambda hw: hw[0] * hw[1])
    fitting = [(bh, bw) for bh, bw in sizes if max(bh / height, bw / width) <= 1.0]  # no upscaling
    bh, bw = fitting[-1] if fitting else sizes[0]
    as_image = rng is not None and rng.random() < spec.image_prob  # image_prob > 0 implies a 1-frame bucket
    available = 1 if num_frames == 1 else max_frames_at_fps(num_frames, fps, target_fps)
    options = [1] if as_image and available >= 1 else [d for d in spec.durations if d <= available]
    if not options:
        rate = "" if target_fps is None else f" at {target_fps:g} fps"
        raise ValueError(f"clip too short for every duration bucket {spec.durations}: {num_frames} frames "
                         f"give {available}{rate}")
    return Bucket(max(options), bh, bw)


# ---------------------------------------------------------------------------------------------------
# The grouping stage
# ---------------------------------------------------------------------------------------------------


class _BucketGroupIterator(grain.DatasetIterator):
    """Buffers ticket indices per bucket; emits a list of `group_size` tickets when a bucket fills."""

    def __init__(self, parent: grain.DatasetIterator, group_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._group_size = group_size
        self._drop_remainder = drop_remainder
        self._pending: dict[Bucket, list[int]] = {}  # insertion order = order of each group's first ticket

    def __next__(self) -> list[Ticket]:
        while True:
            try:
                ticket = next(self._parent)
            except StopIteration:
                # End of a finite stream: hand out the partial groups, oldest first.
                if self._drop_remainder or not self._pending:
                    self._pending.clear()
                    raise
                bucket = next(iter(self._pending))
                return [Ticket(i, bucket) for i in self._pending.pop(bucket)]
            bucket = Bucket(*ticket.bucket)
            group = self._pending.setdefault(bucket, [])
            group.append(int(ticket.index))
            if len(group) == self._group_size:
                return [Ticket(i, bucket) for i in self._pending.pop(bucket)]

    def get_state(self) -> dict[str, Any]:
        pending = [[list(bucket), list(indices)] for bucket, indices in self._pending.items()]
        return {"parent": self._parent.get_state(), "pending": pending}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = {Bucket(*map(int, b)): [int(i) for i in idx] for b, idx in state["pending"]}


class BucketGroupIterDataset(grain.IterDataset):
    """IterDataset stage: Tickets -> lists of `group_size` Tickets of one bucket (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, *, group_size: int, drop_remainder: bool):
        super().__init__(parent)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self._group_size = group_size
        self._drop_remainder = drop_remainder

    def __iter__(self) -> _BucketGroupIterator:
        return _BucketGroupIterator(self._parent.__iter__(), self._group_size, self._drop_remainder)

    def __str__(self) -> str:
        return f"BucketGroupIterDataset(group_size={self._group_size}, drop_remainder={self._drop_remainder})"
