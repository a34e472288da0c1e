"""Pixel-space conditions of `klingjax-generate` -> the DiT's latent "given" mask (pure numpy).

The model works on latents: a causal VAE maps T = 1 + tf * k pixel frames to t = 1 + k latent frames (latent frame
0 <- pixel frame 0, latent frame j >= 1 <- pixel frames tf*j - tf + 1 .. tf*j; its "key frame", the pixel frame
whose lone encoding stands for it, is 0 for j = 0 and tf*j otherwise) and each s x s pixel block to one latent
position; the DiT groups (1, ph, pw) latent positions into a token, and a token is given only if its whole patch is.
Here live the mappings of every flag: key frame snapping (--keyframe), pixel mask -> latent and token grid (--mask),
the outpaint box (--outpaint) and the chunk plan of extension (--extend / --prepend). Errors are `ValueError`s that
name the flag. Neighbours: data/tasks.py (the same patterns drawn at training), eval/generate_cli.py (the command).
"""

from __future__ import annotations

import dataclasses

import numpy as np

Box = tuple[int, int, int, int]  # (top, bottom, left, right) pixel rows / columns, bottom and right exclusive


# ---------------------------------------------------------------------------------------------------
# The model grid
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One clip on the model grid: pixels (num_frames, height, width), the VAE factors, the DiT patch (pt, ph, pw)."""

    num_frames: int
    height: int
    width: int
    temporal_factor: int = 4
    spatial_factor: int = 8
    patch: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self):
        tf, (pt, ph, pw) = self.temporal_factor, self.patch
        if self.num_frames < 1 or (self.num_frames - 1) % tf or ((self.num_frames - 1) // tf + 1) % pt:
            good = [1 + tf * k for k in range(4) if (k + 1) % pt == 0]
            raise ValueError(f"--num_frames {self.num_frames} must be 1 + {tf} * k (e.g. {good}): the causal VAE "
                             f"maps 1 + {tf} * k frames to 1 + k latent frames")
        sh, sw = self.spatial_factor * ph, self.spatial_factor * pw
        if self.height < 1 or self.width < 1 or self.height % sh or self.width % sw:
            raise ValueError(f"--size {self.height}x{self.width} must be a multiple of {sh}x{sw} (VAE stride "
                             f"{self.spatial_factor} x DiT patch {ph}x{pw})")

    @property
    def latent(self) -> tuple[int, int, int]:
        """(t, h, w) of the latents."""
        s = self.spatial_factor
        return 1 + (self.num_frames - 1) // self.temporal_factor, self.height // s, self.width // s

    def key_frame(self, j: int) -> int:
        """The pixel frame whose lone encoding stands for latent frame j (0 for j = 0, else tf * j)."""
        return self.temporal_factor * j

    def frames_of(self, j: int) -> range:
        """The pixel frames latent frame j covers: [0] for j = 0, else tf*j - tf + 1 .. tf*j."""
        return range(0, 1) if j == 0 else range(self.temporal_factor * (j - 1) + 1, self.temporal_factor * j + 1)

    def context_pixels(self, k: int) -> int:
        """Pixel frames of k latent frames of a causal clip: 1 + tf * (k - 1)."""
        return 1 + self.temporal_factor * (k - 1)


# ---------------------------------------------------------------------------------------------------
# Flag values
# ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r} must be HxW, e.g. 32x48") from None
    return h, w


def parse_keyframe(text: str) -> tuple[int, str]:
    """'12:frame.png' -> (12, 'frame.png')."""
    index, sep, path = text.partition(":")
    try:
        if not sep or not path:
            raise ValueError
        return int(index), path
    except ValueError:
        raise ValueError(f"--keyframe {text!r} must be FRAME:IMAGE, e.g. 12:frame.png") from None


def parse_borders(text: str) -> tuple[int, int, int, int]:
    """'L,T,R,B' -> (left, top, right, bottom) pixel border widths (>= 0)."""
    try:
        borders = tuple(int(v) for v in text.split(","))
    except ValueError:
        borders = ()
    if len(borders) != 4 or min(borders) < 0:
        raise ValueError(f"--outpaint {text!r} must be four pixel widths L,T,R,B >= 0, e.g. 8,0,8,0")
    return borders


# ---------------------------------------------------------------------------------------------------
# Masks: (t, h, w) bool, True = given
# ---------------------------------------------------------------------------------------------------


def token_align(given: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """(t, h, w) given mask -> the same with every partly given patch generated (a token is given iff wholly)."""
    t, h, w = given.shape
    pt, ph, pw = patch
    tokens = given.reshape(t // pt, pt, h // ph, ph, w // pw, pw).all(axis=(1, 3, 5))  # (T, H, W) token grid
    return tokens.repeat(pt, 0).repeat(ph, 1).repeat(pw, 2)


def snap_key_frame(index: int, geom: Geometry) -> tuple[int, int]:
    """A pixel frame index -> (latent frame, its key frame): the nearest key frame (ties go later)."""
    if not 0 <= index < geom.num_frames:
        raise ValueError(f"--keyframe {index} is out of range: frames are 0..{geom.num_frames - 1}")
    j = min((index + geom.temporal_factor // 2) // geom.temporal_factor, geom.latent[0] - 1)
    return j, geom.key_frame(j)


def frames_given(geom: Geometry, latent_frames) -> np.ndarray:
    """The whole of each latent frame in `latent_frames` given (negative indices count from the end)."""
    mask = np.zeros(geom.latent, bool)
    mask[list(latent_frames)] = True
    return mask


def pixel_mask_to_given(white: np.ndarray, geom: Geometry) -> np.ndarray:
    """Pixel regenerate-mask (H, W) for every frame or (T, H, W) per frame, True = white = regenerate -> (t, h, w)
    given mask: a latent position is given iff no pixel it covers is white, then rounded to whole tokens."""
    white = np.asarray(white, bool)
    if white.ndim == 2:
        white = np.broadcast_to(white, (geom.num_frames, *white.shape))
    if white.shape != (geom.num_frames, geom.height, geom.width):
        raise ValueError(f"--mask has shape {white.shape[1:]} x {white.shape[0]} frames; need "
                         f"{geom.height}x{geom.width} and {geom.num_frames} frames")
    t, h, w = geom.latent
    s = geom.spatial_factor
    spatial = white.reshape(geom.num_frames, h, s, w, s).any(axis=(2, 4))  # (T, h, w): any white pixel
    touched = np.stack([spatial[list(geom.frames_of(j))].any(axis=0) for j in range(t)])  # (t, h, w)
    return token_align(~touched, geom.patch)


def outpaint_box(geom: Geometry, borders: tuple[int, int, int, int]) -> Box:
    """(left, top, right, bottom) border widths -> the inner content box (top, bottom, left, right) in pixels."""
    left, top, right, bottom = borders
    box = (top, geom.height - bottom, left, geom.width - right)
    if box[1] - box[0] < 1 or box[3] - box[2] < 1:
        raise ValueError(f"--outpaint {left},{top},{right},{bottom} leaves no inner box in a "
                         f"{geom.height}x{geom.width} frame")
    return box


def box_given(geom: Geometry, box: Box) -> np.ndarray:
    """(t, h, w) mask: the latent positions wholly inside the pixel `box` given in every frame, whole tokens only."""
    top, bottom, left, right = box
    s = geom.spatial_factor
    t, h, w = geom.latent
    rows = (np.arange(h) * s >= top) & ((np.arange(h) + 1) * s <= bottom)  # (h,)
    cols = (np.arange(w) * s >= left) & ((np.arange(w) + 1) * s <= right)  # (w,)
    given = np.broadcast_to(rows[:, None] & cols[None, :], (t, h, w))
    given = token_align(given, geom.patch)
    if not given.any():
        raise ValueError(f"--outpaint: the inner box {box} holds no whole token "
                         f"({s * geom.patch[1]}x{s * geom.patch[2]} pixels); use narrower borders")
    return given


def place_in_box(content: np.ndarray, box: Box, height: int, width: int) -> np.ndarray:
    """uint8 (T, bh, bw, 3) content of the box's size -> (T, height, width, 3), the border its edge pixels repeated
    (a continuation the encoder has seen, so the latents inside the box are closest to a real clip's)."""
    top, bottom, left, right = box
    if content.shape[1:3] != (bottom - top, right - left):
        raise ValueError(f"content {content.shape[1:3]} does not fit the box {box}")
    pad = ((0, 0), (top, height - bottom), (left, width - right), (0, 0))
    return np.pad(content, pad, mode="edge")


# ---------------------------------------------------------------------------------------------------
# Extension
# ---------------------------------------------------------------------------------------------------


def plan_chunks(geom: Geometry, context: int, seconds: float, fps: float, available: int,
                flag: str = "--extend") -> list[int]:
    """New frames kept from each chunk of an extension by `seconds` at `fps` with `context` latent frames given.

    Each chunk generates num_frames frames; its first (extend) or last (prepend) 1 + tf * (context - 1) frames are
    the given context, the other tf * (t - context) are new; the last chunk keeps only what is still missing.
    `available`: frames of the input video (it must hold the context).
    """
    t = geom.latent[0]
    if not 1 <= context < t:
        raise ValueError(f"--context_frames {context} must be in 1..{t - 1} (latent frames of a {geom.num_frames}-"
                         "frame chunk, at least one of them generated)")
    need = geom.context_pixels(context)
    if available < need:
        raise ValueError(f"--video has {available} frames, fewer than the {need} pixel frames of --context_frames "
                         f"{context}")
    if not seconds > 0 or not fps > 0:
        raise ValueError(f"{flag} {seconds} seconds at --fps {fps}: both must be > 0")
    total = max(1, round(seconds * fps))
    per_chunk = geom.num_frames - need
    return [per_chunk] * (total // per_chunk) + ([total % per_chunk] if total % per_chunk else [])

