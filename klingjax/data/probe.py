"""Validate and cut local video clips (PyAV); the inputs they come from are listed by `klingjax.data.inputs`.

    load_clip(path, ...)     fully decode (validate) -> Clip: mp4 bytes (stream copy, or re-encoded when cut,
                             resized or not mp4-compatible) + frame count, fps, size, duration
    input_record(item, ...)  a listed `ClipInput` -> a video record for the ArrayRecord shards

`load_clip` raises `ClipError` with a readable reason (empty, unreadable, too large, corrupt, truncated, too
short, bad range); a header declaring a size past `VideoLimits` is refused before any frame is decoded.
Used by `data_pipelines/convert_videos.py` and the TFDS builder in `klingjax/data/tfds_video_text.py`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from fractions import Fraction

import av
import numpy as np

from klingjax.data.inputs import ClipInput
from klingjax.data.records import make_video_record
from klingjax.data.video_io import DEFAULT_LIMITS, VideoLimits, VideoTooLarge, declared_frames, default_codec

MP4_COPY_CODECS = frozenset({"h264", "hevc", "mpeg4", "av1", "vp9"})  # stored as-is inside an mp4 container

# ---------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------


class ClipError(ValueError):
    """A video that cannot become a training clip; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """An encoded mp4 clip plus what decoding it showed; `source_*` describe the input file."""

    data: bytes
    num_frames: int
    fps: float
    height: int
    width: int
    reencoded: bool
    source_frames: int | None  # None when the clip was cut before the source's end (not decoded that far)
    source_height: int
    source_width: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def to_record(self, caption: str, meta: dict | None = None) -> dict:
        """A klingjax video record (codec "mp4") for this clip; `meta` gets duration and source fields."""
        meta = {**(meta or {}), "duration": self.duration, "reencoded": self.reencoded,
                "source_frames": self.source_frames, "source_height": self.source_height,
                "source_width": self.source_width}
        return make_video_record(self.data, codec="mp4", caption=caption, fps=self.fps, num_frames=self.num_frames,
                                 height=self.height, width=self.width, meta=meta)


def target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) scaled down so the longer side is <= max_side, both even; unchanged if already small."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    if max_side < 2:
        raise ValueError(f"max_side must be >= 2, got {max_side}")
    long = max_side - max_side % 2
    short = max(2, 2 * round(min(height, width) * long / max(height, width) / 2))
    return (long, short) if height >= width else (short, long)


class _Mp4Writer:
    """Streaming RGB frames -> mp4 bytes with `encode_mp4`'s settings (libx264 crf 18 / mpeg4, yuv420p)."""

    def __init__(self, rate: Fraction, height: int, width: int, crf: int = 18):
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        codec = default_codec()
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.height, self._stream.width = height + height % 2, width + width % 2  # yuv420p: even sizes
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            self._stream.bit_rate = 8_000_000
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        pad_h, pad_w = rgb.shape[0] % 2, rgb.shape[1] % 2
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (H', W', 3)
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            self._container.mux(packet)
        self.count += 1

    def finish(self) -> bytes:
        for packet in self._stream.encode():  # flush delayed frames
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()


def _decode_error(count: int, e: Exception) -> ClipError:
    return ClipError(f"corrupt or truncated video: decoding failed after {count} frames ({e})")


def _check_complete(count: int, header_frames: int) -> None:
    if count == 0:
        raise ClipError("video has no decodable frames")
    if header_frames and count < header_frames:
        raise ClipError(f"truncated video: decoded {count} of the {header_frames} frames its header lists")


class _MuxError(Exception):
    """The stream copy into mp4 failed (the codec does not fit the container): re-encode instead."""


def _copy(container, stream) -> tuple[bytes, int]:
    """Remux the video stream alone into mp4 while decoding every packet; returns (bytes, frames)."""
    buffer, count = io.BytesIO(), 0
    try:
        out = av.open(buffer, mode="w", format="mp4")
        out_stream = out.add_stream_from_template(stream)
    except (av.error.FFmpegError, ValueError) as e:
        raise _MuxError(e) from e
    try:
        for packet in container.demux(stream):
            try:
                count += len(packet.decode())  # the final empty packet flushes the decoder
            except av.error.FFmpegError as e:
                raise _decode_error(count, e) from e
            if packet.dts is not None:
                packet.stream = out_stream
                try:
                    out.mux(packet)
                except av.error.FFmpegError as e:
                    raise _MuxError(e) from e
    finally:
        try:
            out.close()
        except av.error.FFmpegError as e:
            raise _MuxError(e) from e
    _check_complete(count, stream.frames)
    data = buffer.getvalue()
    with av.open(io.BytesIO(data), mode="r") as check:  # the copy must list every frame it holds
        if check.streams.video[0].frames not in (0, count):
            raise _MuxError(f"the copy lists {check.streams.video[0].frames} frames, decoded {count}")
    return data, count


def _transcode(container, stream, rate: Fraction, size: tuple[int, int], start: float | None,
               end: float | None) -> tuple[bytes, int, int | None]:
    """Decode, keep frames timed in [start, end), resize and re-encode -> (bytes, frames, source frames or None)."""
    fps, base = float(rate), stream.time_base
    half = 0.5 / fps  # a frame belongs to the clip when its timestamp is within half a frame of the range
    lo, hi = (start or 0.0) - half, (end - half if end is not None else np.inf)
    writer = _Mp4Writer(rate, *size)
    count, origin, last_t, reached_end = 0, stream.start_time, -np.inf, False
    try:
        for frame in container.decode(stream):
            if frame.pts is not None and base is not None:
                origin = frame.pts if origin is None else origin
                t = float((frame.pts - origin) * base)
            else:
                t = count / fps
            count, last_t = count + 1, max(last_t, t)
            if t >= hi:
                reached_end = True
                break
            if t >= lo:
                writer.write(frame.to_ndarray(height=size[0], width=size[1], format="rgb24",
                                              interpolation="AREA"))  # (H, W, 3)
    except av.error.FFmpegError as e:
        raise _decode_error(count, e) from e
    if not reached_end:
        _check_complete(count, stream.frames)
        seen = last_t + 1.0 / fps  # the decoded length of the video
        if start is not None and start >= seen - half:
            raise ClipError(f"start {start:g} s is at or past the end of the video ({seen:.3f} s)")
        if end is not None and end > seen + half:
            raise ClipError(f"end {end:g} s is past the end of the video ({seen:.3f} s)")
    if writer.count == 0:
        raise ClipError(f"no frames between start {start} s and end {end} s")
    return writer.finish(), writer.count, None if reached_end else count


def _open_video(path: str, limits: VideoLimits = DEFAULT_LIMITS):
    """(container, first video stream, frame rate, height, width) of a file, or ClipError with the reason.

    Only the header is read: a declared size or frame count past `limits` is refused before any decoding.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ClipError(f"cannot read file: {e.strerror}") from e
    if size == 0:
        raise ClipError("empty file (0 bytes)")
    try:
        container = av.open(path, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ClipError(f"not a readable video file: {getattr(e, 'strerror', None) or e}") from e
    if not container.streams.video:
        container.close()
        raise ClipError("no video stream (not a video, or truncated)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    height, width = stream.codec_context.height, stream.codec_context.width
    if not rate or rate <= 0 or height < 1 or width < 1:
        container.close()
        raise ClipError(f"video stream has no usable frame rate / size ({rate} fps, {height}x{width})")
    try:
        limits.check(width, height, declared_frames(stream))
    except VideoTooLarge as e:
        container.close()
        raise ClipError(str(e)) from e
    return container, stream, Fraction(rate).limit_denominator(1001), height, width


def load_clip(path: str, *, start: float | None = None, end: float | None = None, max_side: int | None = None,
              reencode: bool = False, min_frames: int = 1, limits: VideoLimits = DEFAULT_LIMITS) -> Clip:
    """Validate `path` by decoding it (up to `end`) and return it as an mp4 Clip; raises ClipError with the reason.

    The video stream is copied as-is (audio dropped) unless the clip is cut (`start`/`end`, seconds),
    downscaled to `max_side`, `reencode` is set, or its codec does not fit mp4; then it is re-encoded.
    A header declaring a size or length past `limits` is refused ("too large: ...") before decoding.
    """
    container, stream, rate, height, width = _open_video(path, limits)
    out_size = target_size(height, width, max_side)
    cut = start is not None or end is not None
    copy = not (reencode or cut or out_size != (height, width)) and stream.codec_context.name in MP4_COPY_CODECS
    result = None
    with container:
        if copy:
            try:
                data, frames = _copy(container, stream)
                result = data, frames, frames
            except _MuxError:
                copy = False
    if result is None:
        container, stream, *_ = _open_video(path, limits)
        with container:
            result = _transcode(container, stream, rate, out_size, start, end)
    data, frames, source_frames = result
    if frames < min_frames:
        raise ClipError(f"clip has {frames} frames, fewer than min_frames={min_frames}")
    return Clip(data, frames, float(rate), out_size[0], out_size[1], not copy, source_frames, height, width)


def input_record(item: ClipInput, *, max_side: int | None = None, min_frames: int = 1,
                 reencode: bool = False, limits: VideoLimits = DEFAULT_LIMITS) -> tuple[dict, Clip]:
    """(klingjax video record, Clip) for one listed input; raises ClipError with the reason it cannot be used."""
    if item.error is not None:
        raise ClipError(item.error)
    clip = load_clip(item.path, start=item.start, end=item.end, max_side=max_side, reencode=reencode,
                     min_frames=min_frames, limits=limits)
    return clip.to_record(item.caption, {"source": item.name, "start": item.start, "end": item.end}), clip
