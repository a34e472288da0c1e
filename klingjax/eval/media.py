"""Media writers for samples: mp4 (PyAV), gif (Pillow), video grids and PNG frame-strip grids.

All inputs are uint8, channels-last: a clip is (T, H, W, 3), a set of clips is (N, T, H, W, 3).
Small clips (e.g. 32x32) are enlarged by an integer `scale` with nearest-neighbour so they stay sharp.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from klingjax.data.video_io import Mp4Writer, decode_video, encode_mp4


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be (T, H, W, 3) with T >= 1, got {arr.shape}")
    return arr


def _check_videos(videos: np.ndarray) -> np.ndarray:
    arr = np.asarray(videos)
    if arr.ndim != 5 or arr.shape[0] == 0:
        raise ValueError(f"videos must be (N, T, H, W, 3) with N >= 1, got {arr.shape}")
    _check_frames(arr[0], "videos[0]")
    return arr


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscale of (..., H, W, C) -> (..., H*scale, W*scale, C)."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale == 1:
        return frames
    return np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, *, scale: int = 1, crf: int = 18) -> None:
    """Write uint8 frames (T, H, W, 3) to an H.264 (or MPEG-4) yuv420p mp4, upscaled by `scale`."""
    data = encode_mp4(upscale(_check_frames(frames), scale), fps, crf=crf)
    with open(os.fspath(path), "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name next to `path` (same suffix) that becomes `path` when the block ends without an error;
    on an error it is removed, so a failed write never leaves a partial file (nor replaces a good one)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1], prefix="." + os.path.basename(path) + ".",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would have made
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def mp4_stream(path: str | os.PathLike, fps: float, *, scale: int = 1,
               crf: int = 18) -> Iterator[Callable[[np.ndarray], None]]:
    """`write(frames)` appending uint8 (n, H, W, 3) chunks to an mp4 at `path`, in memory constant in its length;
    the file appears (atomically) when the block ends without an error."""
    with atomic_path(path) as tmp, Mp4Writer(tmp, fps, crf=crf) as writer:
        yield lambda frames: writer.write(upscale(_check_frames(frames), scale))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file to uint8 frames (T, H, W, 3) with PyAV."""
    with open(os.fspath(path), "rb") as f:
        return decode_video(f.read())


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float, *, scale: int = 1, loop: int = 0) -> None:
    """Write uint8 frames (T, H, W, 3) to a looping animated gif, upscaled by `scale`."""
    arr = upscale(_check_frames(frames), scale)
    images = [Image.fromarray(f) for f in arr]
    duration = max(10, round(1000.0 / fps))  # gif delays are in 10 ms units; most viewers clamp < 20 ms
    images[0].save(
        os.fspath(path), save_all=True, append_images=images[1:], duration=duration, loop=loop, optimize=False
    )


def video_grid(videos: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile videos (N, T, H, W, 3) into one video (T, H', W', 3) with `ncols` columns and `pad` borders."""
    arr = _check_videos(videos)
    n, t, h, w, c = arr.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = np.full((t, nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = arr[i]
    return grid


def frame_strip(frames: np.ndarray, frames_per_row: int, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """`frames_per_row` evenly spaced frames of (T, H, W, 3) side by side: (H, k*W + (k-1)*pad, 3)."""
    arr = _check_frames(frames)
    idx = np.linspace(0, arr.shape[0] - 1, max(1, frames_per_row)).round().astype(int)
    _, h, w, c = arr.shape
    strip = np.full((h, len(idx) * (w + pad) - pad, c), pad_value, np.uint8)
    for j, t in enumerate(idx):
        strip[:, j * (w + pad) : j * (w + pad) + w] = arr[t]
    return strip


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Truncate text with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_png_grid(
    path: str | os.PathLike,
    videos: np.ndarray,
    ncols: int,
    frames_per_row: int,
    *,
    scale: int = 1,
    captions: Sequence[str] | None = None,
    pad: int = 4,
) -> np.ndarray:
    """PNG of per-video strips of evenly spaced frames in `ncols` columns, optional captions; returns it."""
    arr = upscale(_check_videos(videos), scale)
    if captions is not None and len(captions) != arr.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {arr.shape[0]} videos")
    strips = np.stack([frame_strip(v, frames_per_row) for v in arr])  # (N, H, W', 3)
    n, h, w, _ = strips.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    font = ImageFont.load_default()
    text_h = 0
    if captions is not None:
        left, top, right, bottom = font.getbbox("Ag")
        text_h = bottom - min(top, 0) + 4
    cell_h, cell_w = h + text_h, w
    canvas = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, ncols)
        x, y = pad + col * (cell_w + pad), pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(strips[i]), (x, y))
        if captions is not None:
            draw.text((x, y + h + 2), _fit_text(draw, str(captions[i]), font, cell_w), fill="black", font=font)
    canvas.save(os.fspath(path), format="PNG")
    return np.asarray(canvas)
