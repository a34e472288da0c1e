"""Encode uint8 frames to mp4 bytes and decode video file bytes to uint8 frames, in memory, with PyAV."""

from __future__ import annotations

import functools
import io
from fractions import Fraction

import av
import numpy as np


@functools.cache
def default_codec() -> str:
    """The mp4 video encoder to use: libx264 (h264) when this PyAV build has it, else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: np.ndarray, fps: float, *, codec: str | None = None, crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) RGB frames -> mp4 file bytes (yuv420p; odd H or W are padded by edge repeat)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    # yuv420p needs even sizes: pad by repeating the last row / column.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = codec or default_codec()
    rate = Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 8_000_000  # mpeg4 has no crf; a high rate keeps tiny clips near lossless
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return buffer.getvalue()


def decode_video(data: bytes, *, max_frames: int | None = None) -> np.ndarray:
    """Encoded video file bytes -> uint8 (T, H, W, 3) RGB frames (first video stream, at most `max_frames`)."""
    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError("video contains no decodable frames")
    return np.stack(frames)  # (T, H, W, 3)


def video_fps(data: bytes) -> float:
    """Average frame rate of the first video stream of encoded video bytes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 0.0
