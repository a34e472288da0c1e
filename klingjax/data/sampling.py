"""What one example becomes: frame indices at a target fps, resize + crop, caption dropout, record decoding.

Everything random takes an explicit `np.random.Generator`; the pipeline derives one per example from
(seed, host, stream position, purpose) with `example_rng`, so a run, its resume and its re-decode of an
example all draw the same values. `rng=None` means the deterministic (eval) choice: a centred window, a
centre crop, no dropout. `decode_video_record` / `VideoDecoder` put them together for video records
(also importable from klingjax.data.pipeline).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from klingjax.data.video_io import DEFAULT_LIMITS, VideoLimits, decode_frames, probe_video

# Purposes of the per-example generators: separate streams, so turning one feature on does not move another.
RNG_DECODE, RNG_CAPTION, RNG_BUCKET = 0, 1, 2
_EPS = 1e-6  # float slack when dividing frame spans by a fractional stride


def example_rng(seed: int, host: int, index: int, purpose: int) -> np.random.Generator:
    """The generator of one example for one purpose; a pure function of its four integers."""
    return np.random.default_rng([seed, host, index, purpose])


# ---------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------


def frame_stride(source_fps: float | None, target_fps: float | None) -> float:
    """Source frames per output frame: source_fps / target_fps (1 when no target rate is asked for)."""
    if target_fps is None:
        return 1.0
    if target_fps <= 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    if not source_fps or source_fps <= 0:
        raise ValueError(f"clip has no usable frame rate ({source_fps!r}); cannot resample to {target_fps} fps")
    return float(source_fps) / float(target_fps)


def max_frames_at_fps(num_source_frames: int, source_fps: float | None, target_fps: float | None) -> int:
    """How many frames a clip of `num_source_frames` yields at `target_fps` (0 for an empty clip)."""
    if num_source_frames <= 0:
        return 0
    return int(math.floor((num_source_frames - 1) / frame_stride(source_fps, target_fps) + _EPS)) + 1


def temporal_indices(num_source_frames: int, num_frames: int, *, source_fps: float | None = None,
                     target_fps: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Source frame indices (num_frames,) of a window at `target_fps`: nearest frame to start + i * stride.

    The start frame is uniform over every window that fits when `rng` is given, else the centred one
    (with stride 1: frames (F - n) // 2 ...). Raises ValueError when the clip is too short.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    stride = frame_stride(source_fps, target_fps)
    available = max_frames_at_fps(num_source_frames, source_fps, target_fps)
    if available < num_frames:
        rate = "" if target_fps is None else f" at {target_fps:g} fps (source {source_fps:g} fps)"
        raise ValueError(f"clip too short: {num_source_frames} frames give {available}{rate}, {num_frames} needed")
    last_start = int(math.floor((num_source_frames - 1) - (num_frames - 1) * stride + _EPS))  # >= 0 here
    start = int(rng.integers(0, last_start + 1)) if rng is not None else last_start // 2
    positions = start + np.arange(num_frames) * stride  # (num_frames,)
    return np.minimum(np.floor(positions + 0.5).astype(np.int64), num_source_frames - 1)


# ---------------------------------------------------------------------------------------------------
# Space
# ---------------------------------------------------------------------------------------------------


def cover_crop(h: int, w: int, height: int, width: int,
               rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): the size that covers (height, width) at h/w's aspect, and the crop offset.

    The offset is centred, or uniform over every position when `rng` is given.
    """
    if min(h, w, height, width) < 1:
        raise ValueError(f"bad sizes: frame {h}x{w}, target {height}x{width}")
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    spare_h, spare_w = new_h - height, new_w - width
    if rng is None:
        return new_h, new_w, spare_h // 2, spare_w // 2
    fy, fx = rng.random(), rng.random()
    return new_h, new_w, min(spare_h, int((spare_h + 1) * fy)), min(spare_w, int((spare_w + 1) * fx))


def resize_crop(frames: np.ndarray, height: int, width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (T, h, w, 3) -> uint8 (T, height, width, 3): resize to cover, crop centred (or random with `rng`)."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    new_h, new_w, top, left = cover_crop(h, w, height, width, rng)
    sy, sx = new_h / h, new_w / w
    box = (left / sx, top / sy, (left + width) / sx, (top + height) / sy)  # the crop window in source pixels
    out = np.empty((t, height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        # Resizing only the box (PIL's `box`) skips the pixels the crop would throw away.
        image = Image.fromarray(frame).resize((width, height), Image.BILINEAR, box=box, reducing_gap=2.0)
        out[i] = np.asarray(image)
    return out


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


def drop_caption(caption: str, p: float, rng: np.random.Generator) -> str:
    """The empty caption with probability `p` (classifier-free guidance training), else `caption`."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {p}")
    return "" if rng.random() < p else caption


# ---------------------------------------------------------------------------------------------------
# Video records
# ---------------------------------------------------------------------------------------------------


def video_metadata(record: Mapping[str, Any], *, probe: bool = True,
                   limits: VideoLimits = DEFAULT_LIMITS) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a video record without decoding frames.

    mp4 headers are probed (and checked against the record) unless `probe=False` and the record has them.
    Raises VideoTooLarge (a ValueError) when the record or its mp4 header declares a size past `limits`.
    """
    codec = record.get("codec")
    if codec == "raw":
        video = np.asarray(record["video"])
        shape = video.shape
        if video.dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"raw video must be uint8 (T, H, W, 3), got {video.dtype} {shape}")
        limits.check(shape[2], shape[1], shape[0])
        return shape[0], shape[1], shape[2], float(record.get("fps") or 0)
    if codec == "mp4":
        keys = ("num_frames", "height", "width", "fps")
        if not probe and all(record.get(k) for k in keys):
            frames, height, width = (int(record[k]) for k in keys[:3])
            limits.check(width, height, frames)  # the mp4's own header is checked again when it is decoded
            return frames, height, width, float(record["fps"])
        info = probe_video(record["video"], limits=limits)
        frames = int(record.get("num_frames") or info.num_frames)
        if frames > info.num_frames:
            raise ValueError(f"record says {frames} frames, its mp4 holds {info.num_frames}")
        height, width = int(record.get("height") or info.height), int(record.get("width") or info.width)
        limits.check(width, height, frames)
        return frames, height, width, float(record.get("fps") or info.fps)
    raise ValueError(f"unknown codec {codec!r}")


def decode_video_record(record: Mapping[str, Any], *, num_frames: int, height: int, width: int,
                        target_fps: float | None = None, rng: np.random.Generator | None = None,
                        random_start: bool = False, random_crop: bool = False, dtype=np.float32,
                        limits: VideoLimits = DEFAULT_LIMITS) -> dict:
    """Video record -> {"video": float32 (T, H, W, 3) in [-1, 1], "caption": str, "meta_json": str}.

    Takes `num_frames` frames at `target_fps` (None: consecutive source frames) from the centred window
    (a random one with `random_start`), resized to cover (height, width) and centre- (or `random_crop`)
    cropped; random choices use `rng`. mp4 records decode only up to the last frame taken. A float
    `dtype` gives values in [-1, 1]; np.uint8 keeps pixels in [0, 255] (4x less to batch and move; scale
    on the device). Raises ValueError for clips shorter than needed and VideoTooLarge for records (or mp4
    headers) declaring a size past `limits`, before decoding (the pipeline skips and counts both).
    """
    if (random_start or random_crop) and rng is None:
        raise ValueError("random_start / random_crop need an rng")
    codec = record["codec"]
    total, h, w, fps = video_metadata(record, probe=False, limits=limits)
    idx = temporal_indices(total, num_frames, source_fps=fps, target_fps=target_fps,
                           rng=rng if random_start else None)  # (num_frames,)
    crop_rng = rng if random_crop else None
    cover_h, cover_w, _, _ = cover_crop(h, w, height, width)  # the scaled size; no rng drawn for it
    if codec == "raw":
        frames = resize_crop(np.asarray(record["video"])[idx], height, width, crop_rng)  # (T, H, W, 3) uint8
    elif h % 2 or w % 2 or cover_h * cover_w > limits.max_pixels or max(cover_h, cover_w) > limits.max_side:
        # encode_mp4 pads odd sizes to even ones: drop the padding the record's header says is not content.
        # A very thin clip (e.g. 8 x 4096) would cover the target at an absurd scaled size: resize_crop
        # scales only the crop window instead.
        frames = resize_crop(decode_frames(record["video"], idx, limits=limits)[:, :h, :w], height, width, crop_rng)
    else:  # scale while converting to RGB (cheaper than a second resize pass), then crop
        new_h, new_w, top, left = cover_crop(h, w, height, width, crop_rng)
        frames = decode_frames(record["video"], idx, size=(new_h, new_w), limits=limits)
        frames = frames[:, top:top + height, left:left + width]  # (T, height, width, 3)
    if np.dtype(dtype) == np.uint8:
        video = frames
    else:
        video = np.multiply(frames, 1 / 127.5, dtype=dtype)  # (T, H, W, 3)
        video -= 1
    return {
        "video": video,
        "caption": str(record["caption"]),
        "meta_json": json.dumps(record.get("meta", {}), sort_keys=True),
    }


@dataclasses.dataclass(frozen=True)
class VideoDecoder(grain.transforms.RandomMap):
    """Picklable `decode` for `make_dataset`: gets a per-example rng, and the batch shape under buckets."""

    num_frames: int
    height: int
    width: int
    target_fps: float | None = None
    random_start: bool = False  # training: a random window; eval: the centred one
    random_crop: bool = False
    dtype: Any = np.float32  # float: [-1, 1]; np.uint8: [0, 255]
    limits: VideoLimits = DEFAULT_LIMITS  # records declaring larger videos are refused (counted failures)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
        return decode_video_record(element, num_frames=self.num_frames, height=self.height, width=self.width,
                                   target_fps=self.target_fps, rng=rng, random_start=self.random_start,
                                   random_crop=self.random_crop, dtype=self.dtype, limits=self.limits)

    def with_shape(self, shape: tuple[int, int, int]) -> VideoDecoder:
        """This decoder producing clips of `shape` = (frames, height, width), e.g. a bucket."""
        num_frames, height, width = shape
        return dataclasses.replace(self, num_frames=num_frames, height=height, width=width)
