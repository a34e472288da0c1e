"""Encode uint8 frames to mp4 bytes and decode video file bytes to uint8 frames, in memory, with PyAV."""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# Seek (to the key frame before the first wanted frame) only when that frame is at least this far in:
# closer in, decoding from the start costs about as much as the seek.
SEEK_MIN_FRAMES = 16


class VideoTooLarge(ValueError):
    """A video whose header declares a size past `VideoLimits`; refused before any frame is decoded."""


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """The largest video a header may declare before it is decoded (one 36 MP frame is ~100 MB as RGB).

    Headers are data from the file: a hostile or corrupt one can declare 100000 px wide frames, and each
    decoded frame would be allocated at that size. 8192 px a side and 36 MP cover 8K video.
    """

    max_side: int = 8192
    max_pixels: int = 36_000_000
    max_frames: int = 10_000_000  # ~28 h at 100 fps: more is a corrupt header, not a video

    def check(self, width: int, height: int, frames: int = 0) -> None:
        """Raise VideoTooLarge ("too large: 100000x64 ...") if a declared size is past these limits."""
        if max(width, height) > self.max_side:
            raise VideoTooLarge(f"too large: {width}x{height} (width x height) is over {self.max_side} px a side")
        if width * height > self.max_pixels:
            raise VideoTooLarge(f"too large: {width}x{height} (width x height) is {width * height / 1e6:.1f} MP, "
                                f"over {self.max_pixels / 1e6:g} MP")
        if frames > self.max_frames:
            raise VideoTooLarge(f"too long: {frames} frames, over {self.max_frames}")


DEFAULT_LIMITS = VideoLimits()


@functools.cache
def default_codec() -> str:
    """The mp4 video encoder to use: libx264 (h264) when this PyAV build has it, else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class Mp4Writer:
    """uint8 RGB frames -> an H.264 (or MPEG-4) yuv420p mp4, written chunk by chunk: memory does not grow with the
    clip's length (a minutes-long rollout streams through it). `file`: a path or a writable binary file object.

        with Mp4Writer("out.mp4", fps=8) as w:
            for chunk in chunks:  # uint8 (n, H, W, 3), the same H, W every time
                w.write(chunk)
    """

    def __init__(self, file, fps: float, *, codec: str | None = None, crf: int = 18):
        self._container = av.open(file, mode="w", format="mp4")
        self._codec, self._crf, self._fps = codec or default_codec(), crf, fps
        self._stream = None
        self.num_frames = 0

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 (n, H, W, 3) frames (odd H or W are padded by edge repeat; yuv420p needs even sizes)."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream(self._codec, rate=Fraction(self._fps).limit_denominator(1001))
            self._stream.width, self._stream.height = frames.shape[2], frames.shape[1]
            self._stream.pix_fmt = "yuv420p"
            if self._codec == "libx264":
                self._stream.options = {"crf": str(self._crf), "preset": "veryfast"}
            else:
                self._stream.bit_rate = 8_000_000  # mpeg4 has no crf; a high rate keeps tiny clips near lossless
        elif (frames.shape[2], frames.shape[1]) != (self._stream.width, self._stream.height):
            raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} after frames of "
                             f"{self._stream.height}x{self._stream.width}")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.num_frames += len(frames)

    def close(self) -> None:
        """Flush the encoder's delayed frames and finish the file."""
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_mp4(frames: np.ndarray, fps: float, *, codec: str | None = None, crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) RGB frames -> mp4 file bytes (yuv420p; odd H or W are padded by edge repeat)."""
    buffer = io.BytesIO()
    with Mp4Writer(buffer, fps, codec=codec, crf=crf) as writer:
        writer.write(frames)
    return buffer.getvalue()


class _ToRGB:
    """Frame -> uint8 (H, W, 3) RGB, scaled to `size` (H, W) first if given.

    It keeps its libswscale contexts, which `frame.to_ndarray` would rebuild for every frame (~3x slower),
    and scales before the colour conversion, which moves fewer bytes.
    """

    def __init__(self, size: tuple[int, int] | None = None):
        self._size = size
        self._scaler, self._converter = VideoReformatter(), VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        if self._size is not None and self._size != (frame.height, frame.width):
            frame = self._scaler.reformat(frame, width=self._size[1], height=self._size[0], interpolation="BILINEAR")
        return self._converter.reformat(frame, format="rgb24").to_ndarray()


def decode_video(data: bytes, *, max_frames: int | None = None, limits: VideoLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded video file bytes -> uint8 (T, H, W, 3) RGB frames (first video stream, at most `max_frames`).

    Raises VideoTooLarge, before decoding, when the header declares a size or frame count past `limits`.
    """
    frames, to_rgb = [], _ToRGB()
    with _open(data) as container:
        stream = _video_stream(container)
        _check_declared(stream, limits, count_frames=max_frames is None)
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(to_rgb(frame))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError("video contains no decodable frames")
    return np.stack(frames)  # (T, H, W, 3)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Stream metadata of an encoded video, read from the container header."""

    num_frames: int
    fps: float
    height: int
    width: int


def _open(data: bytes):
    """av container over in-memory bytes, with a clear ValueError for empty or unreadable input."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"video must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("video is empty (0 bytes)")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable video container ({len(data)} bytes): {e}") from e


def _video_stream(container):
    if not container.streams.video:
        raise ValueError("container has no video stream (truncated or not a video)")
    return container.streams.video[0]


def declared_frames(stream) -> int:
    """The frame count a stream's header declares (from its duration when the container has no count; 0: none)."""
    frames = int(stream.frames or 0)
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if not frames and stream.duration and stream.time_base and fps:  # containers without a frame count
        frames = int(round(float(stream.duration * stream.time_base) * fps))
    return frames


def _check_declared(stream, limits: VideoLimits, count_frames: bool = True) -> None:
    """Refuse a stream whose header declares a size (and, with `count_frames`, a length) past `limits`."""
    limits.check(stream.codec_context.width, stream.codec_context.height,
                 declared_frames(stream) if count_frames else 0)


def probe_video(data: bytes, *, limits: VideoLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream, from the header alone (no decoding).

    Raises VideoTooLarge when the header declares a size or frame count past `limits`.
    """
    with _open(data) as container:
        stream = _video_stream(container)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = declared_frames(stream)
        height, width = stream.codec_context.height, stream.codec_context.width
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"video stream is empty: {frames} frames of {height}x{width}")
    limits.check(width, height, frames)
    return VideoInfo(frames, fps, height, width)


def decode_frames(data: bytes, indices: Sequence[int], *, size: tuple[int, int] | None = None,
                  seek: bool = True, limits: VideoLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Frames `indices` (non-decreasing, repeats allowed) of the first video stream -> uint8 (n, H, W, 3).

    Decoding stops after the last wanted frame and converts only wanted frames to RGB, scaled to `size`
    (H, W) on the way when given (libswscale bilinear, cheaper than resizing RGB afterwards). With `seek`,
    when the first wanted frame is SEEK_MIN_FRAMES or more in, the demuxer jumps to the key frame before it
    and frame numbers come from timestamps (constant frame rate assumed); if the jump overshoots, the
    clip is decoded from the start instead. Raises ValueError when the stream ends before a wanted frame, and
    VideoTooLarge, before decoding, when the header's frame size (or the asked `size`) is past `limits`.
    """
    idx = np.asarray(indices, np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx[0] < 0 or np.any(np.diff(idx) < 0):
        raise ValueError(f"indices must be a non-empty non-decreasing list of frame numbers, got {idx.tolist()}")
    wanted, last = set(idx.tolist()), int(idx[-1])
    got: dict[int, np.ndarray] = {}
    to_rgb = _ToRGB(size)
    if size is not None:
        limits.check(size[1], size[0])
    with _open(data) as container:
        stream = _video_stream(container)
        _check_declared(stream, limits, count_frames=False)  # only frames up to the last index are decoded
        stream.thread_type = "AUTO"
        rate, base = stream.average_rate, stream.time_base
        origin = stream.start_time or 0
        by_pts = bool(seek and idx[0] >= SEEK_MIN_FRAMES and rate and base)
        if by_pts:
            container.seek(origin + int(idx[0] / rate / base), stream=stream, backward=True, any_frame=False)
        count = 0
        try:
            for frame in container.decode(stream):
                if by_pts:
                    if frame.pts is None:
                        return decode_frames(data, indices, size=size, seek=False, limits=limits)
                    number = int(round(float((frame.pts - origin) * base * rate)))
                    if count == 0 and number > idx[0]:  # landed after the first wanted frame
                        return decode_frames(data, indices, size=size, seek=False, limits=limits)
                else:
                    number = count
                count += 1
                if number in wanted:
                    got[number] = to_rgb(frame)
                if number >= last:
                    break
        except av.error.FFmpegError as e:
            raise ValueError(f"video is corrupt after {count} decoded frames: {e}") from e
    missing = sorted(wanted - got.keys())
    if missing:
        raise ValueError(f"video ends before frame {missing[0]} ({len(got)} of {len(wanted)} wanted frames decoded)")
    return np.stack([got[i] for i in idx.tolist()])  # (n, H, W, 3)


def video_fps(data: bytes) -> float:
    """Average frame rate of the first video stream of encoded video bytes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 0.0
