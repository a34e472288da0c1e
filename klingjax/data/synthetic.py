"""Deterministic captioned moving-sprite clips with ground-truth metadata (the embedded demo dataset).

Every clip is a function of `(spec, seed, index[, split])`: a textured solid background, one or two
anti-aliased sprites (circle / square / triangle) moving in a straight line at constant speed, and
optionally a constant camera pan. Under a pan the background texture and every object shift together;
an object's `direction` is its motion relative to the scene. Pan speed is kept below 0.4x the slowest
object speed, so the sign of an object's on-screen motion along its axis always matches its direction.

The held-out split is a fixed subset of (colour, shape, direction, background) combinations chosen by
a stable hash, independent of the seed: eval clips only use held-out combos, train clips never do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

DEFAULT_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 190, 60)),
    ("blue", (40, 70, 240)),
    ("yellow", (235, 215, 50)),
    ("magenta", (215, 50, 215)),
    ("cyan", (40, 220, 220)),
)
DEFAULT_BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (20, 20, 20)),
    ("gray", (100, 100, 100)),
    ("navy", (20, 25, 80)),
)
# Unit (dy, dx) per direction word, image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPLITS: dict[str, int] = {"train": 0, "eval": 1}
_MARGIN = 1.0  # px kept free between a sprite's bbox and the frame border
_TEXTURE_AMPLITUDE = 2.5  # per sinusoid; three of them -> at most +-7.5 grey levels
_PAN_TO_SPEED = 0.4  # pan speed <= this x slowest object speed
_SINGLE_TEMPLATES = (
    "a {colour} {shape} moves {direction} on a {background} background",
    "a {colour} {shape} moving {direction} on a {background} background",
    "a {colour} {shape} slides {direction} across a {background} background",
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What the generator draws: clip size, vocabularies (name -> RGB tables as pairs), motion ranges."""

    num_frames: int = 17
    height: int = 32
    width: int = 32
    fps: int = 8
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_COLOURS
    backgrounds: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_BACKGROUNDS
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    speed_range: tuple[float, float] = (0.6, 1.0)  # px / frame, clamped so sprites stay in frame
    size_range: tuple[float, float] = (6.0, 10.0)  # bbox width in px
    pan_speed_range: tuple[float, float] = (0.15, 0.24)  # px / frame
    p_two_objects: float = 0.0
    p_camera_pan: float = 0.0
    heldout_fraction: float = 0.1

    def __post_init__(self):
        unknown = set(self.shapes) - set(_SDF)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {sorted(_SDF)}")
        unknown = set(self.directions) - set(DIRECTION_VECTORS)
        if unknown:
            raise ValueError(f"unknown directions {sorted(unknown)}; known: {sorted(DIRECTION_VECTORS)}")
        if self.size_range[1] + 2 * _MARGIN >= min(self.height, self.width):
            raise ValueError(f"size_range {self.size_range} does not fit a {self.height}x{self.width} frame")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")

    @property
    def colour_table(self) -> dict[str, np.ndarray]:
        """Colour name -> float32 RGB."""
        return {k: np.asarray(v, np.float32) for k, v in self.colours}

    @property
    def background_table(self) -> dict[str, np.ndarray]:
        """Background name -> float32 RGB."""
        return {k: np.asarray(v, np.float32) for k, v in self.backgrounds}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticSpec:
        """Inverse of `to_dict` (lists from JSON become tuples again)."""
        def tup(x):
            return tuple(tup(v) for v in x) if isinstance(x, list | tuple) else x

        return cls(**{k: tup(v) for k, v in d.items()})


class Clip(NamedTuple):
    """One generated clip: uint8 frames (T, H, W, 3), its caption and JSON-serialisable metadata."""

    frames: np.ndarray
    caption: str
    meta: dict


Combo = tuple[str, str, str, str]  # (colour, shape, direction, background)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=32)
def heldout_combos(spec: SyntheticSpec) -> frozenset[Combo]:
    """The held-out (colour, shape, direction, background) combos: ~heldout_fraction of all, by stable hash."""
    colours = [c for c, _ in spec.colours]
    backgrounds = [b for b, _ in spec.backgrounds]
    combos = list(itertools.product(colours, spec.shapes, spec.directions, backgrounds))
    target = round(spec.heldout_fraction * len(combos))
    held: set[Combo] = set()
    # Count how often each attribute value appears in the remaining (train) combos, so that
    # holding a combo out never removes a colour / shape / direction / background from training.
    remaining = [dict.fromkeys(vals, 0) for vals in (colours, spec.shapes, spec.directions, backgrounds)]
    for combo in combos:
        for i, v in enumerate(combo):
            remaining[i][v] += 1
    for combo in sorted(combos, key=lambda c: _stable_hash("|".join(c))):
        if len(held) >= target:
            break
        if all(remaining[i][v] > 1 for i, v in enumerate(combo)):
            held.add(combo)
            for i, v in enumerate(combo):
                remaining[i][v] -= 1
    return frozenset(held)


@functools.lru_cache(maxsize=32)
def split_combos(spec: SyntheticSpec, split: str) -> tuple[Combo, ...]:
    """All combos allowed in `split` ("train" or "eval"), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    held = heldout_combos(spec)
    colours = [c for c, _ in spec.colours]
    backgrounds = [b for b, _ in spec.backgrounds]
    combos = itertools.product(colours, spec.shapes, spec.directions, backgrounds)
    return tuple(c for c in combos if (c in held) == (split == "eval"))


# ---------------------------------------------------------------------------------------------------
# Rasterisation: signed distance (px, negative inside) -> coverage = clip(0.5 - sd, 0, 1).
# dy: (T, H, 1), dx: (T, 1, W) offsets from the sprite's bbox centre; w, h: bbox size.
# ---------------------------------------------------------------------------------------------------


def _sdf_circle(dy, dx, w, h):
    return np.sqrt(dy * dy + dx * dx) - 0.5 * w


def _sdf_square(dy, dx, w, h):
    return np.maximum(np.abs(dy), np.abs(dx)) - 0.5 * w


def _sdf_triangle(dy, dx, w, h):
    # Upward-pointing triangle: apex (0, -h/2), base from (h/2, -w/2) to (h/2, w/2), as (y, x).
    norm = np.hypot(h, 0.5 * w)
    left = (-h * dx - 0.5 * w * (dy + 0.5 * h)) / norm
    right = (h * dx - 0.5 * w * (dy + 0.5 * h)) / norm
    return np.maximum(np.maximum(left, right), dy - 0.5 * h)


_SDF = {"circle": _sdf_circle, "square": _sdf_square, "triangle": _sdf_triangle}


def sprite_height(shape: str, size: float) -> float:
    """Bbox height of a sprite of bbox width `size` (equilateral triangles are shorter)."""
    return size * np.sqrt(3.0) / 2.0 if shape == "triangle" else size


def rasterize(shape: str, size: float, top_left: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (T, H, W), of a sprite whose bbox top-left per frame is (T, 2) (y, x)."""
    h = sprite_height(shape, size)
    cy = top_left[:, 0] + 0.5 * h
    cx = top_left[:, 1] + 0.5 * size
    dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - cy[:, None, None]  # (T, H, 1)
    dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - cx[:, None, None]  # (T, 1, W)
    return np.clip(0.5 - _SDF[shape](dy, dx, size, h), 0.0, 1.0).astype(np.float32)


def _texture(rng: np.random.Generator, offsets: np.ndarray, height: int, width: int) -> np.ndarray:
    """Faint non-periodic texture (T, H, W) of the scene seen through camera offsets (T, 2) (y, x)."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    tex = np.zeros((len(offsets), height, width), np.float32)
    angles = rng.uniform(0, np.pi, 3) + np.array([0.0, np.pi / 3, 2 * np.pi / 3])
    for angle, wavelength, phase in zip(angles, rng.uniform(5.0, 11.0, 3), rng.uniform(0, 2 * np.pi, 3)):
        fy, fx = np.sin(angle) / wavelength, np.cos(angle) / wavelength
        spatial = 2 * np.pi * (fy * ys + fx * xs) + phase  # (H, W)
        shift = 2 * np.pi * (fy * offsets[:, 0] + fx * offsets[:, 1])  # (T,)
        tex += _TEXTURE_AMPLITUDE * np.sin(spatial[None] + shift[:, None, None])
    return tex


# ---------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------


def _sample_combos(spec: SyntheticSpec, rng: np.random.Generator, split: str | None) -> list[Combo]:
    combos = split_combos(spec, split) if split else split_combos(spec, "train") + split_combos(spec, "eval")
    if not combos:
        raise ValueError(f"split {split!r} has no combos (heldout_fraction={spec.heldout_fraction})")
    first = combos[rng.integers(len(combos))]
    if rng.random() >= spec.p_two_objects:
        return [first]
    # The second object shares the background and never the colour (so the two stay separable).
    others = [c for c in combos if c[3] == first[3] and c[0] != first[0]]
    return [first, others[rng.integers(len(others))]] if others else [first]


def _caption(rng: np.random.Generator, combos: list[Combo], camera: str) -> str:
    background = combos[0][3]
    if len(combos) == 1:
        c, s, d, b = combos[0]
        text = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))].format(
            colour=c, shape=s, direction=d, background=b)
    else:
        parts = [f"a {c} {s} moves {d}" for c, s, d, _ in combos]
        text = " and ".join(parts) + f" on a {background} background"
    if camera != "static":
        text += f", the camera pans {camera.removeprefix('pan_')}"
    return text


def generate_clip(spec: SyntheticSpec, seed: int, index: int, split: str | None = None) -> Clip:
    """Clip number `index` of stream `seed` (restricted to `split`'s combos when given); deterministic."""
    key = [seed, index] if split is None else [seed, index, SPLITS[split]]
    rng = np.random.default_rng(key)
    t_len, height, width = spec.num_frames, spec.height, spec.width
    combos = _sample_combos(spec, rng, split)
    sizes = rng.uniform(*spec.size_range, len(combos))
    speeds = rng.uniform(*spec.speed_range, len(combos))

    camera, cam_velocity = "static", np.zeros(2)
    if rng.random() < spec.p_camera_pan:
        pan_dir = spec.directions[rng.integers(len(spec.directions))]
        camera = f"pan_{pan_dir}"
        pan_speed = min(rng.uniform(*spec.pan_speed_range), _PAN_TO_SPEED * speeds.min())
        cam_velocity = pan_speed * np.asarray(DIRECTION_VECTORS[pan_dir], np.float64)

    # On-screen velocity = object velocity in the scene minus camera velocity; shrink every speed by
    # one common factor if some sprite could not stay fully inside the frame for the whole clip.
    obj_velocity = np.stack([s * np.asarray(DIRECTION_VECTORS[c[2]], np.float64) for s, c in zip(speeds, combos)])
    img_velocity = obj_velocity - cam_velocity  # (n, 2)
    extents = np.stack([[sprite_height(c[1], s), s] for s, c in zip(sizes, combos)])  # (n, 2) (h, w)
    room = np.array([height, width]) - 2 * _MARGIN - extents  # (n, 2)
    travel = np.abs(img_velocity) * max(t_len - 1, 1)
    factor = min(1.0, float(np.min(room / np.maximum(travel, 1e-9))))
    speeds, cam_velocity, img_velocity = speeds * factor, cam_velocity * factor, img_velocity * factor
    travel = travel * factor

    t = np.arange(t_len, dtype=np.float64)
    cam_offsets = t[:, None] * cam_velocity[None]  # (T, 2) camera position in the scene
    bg_name = combos[0][3]
    frames = np.broadcast_to(spec.background_table[bg_name], (t_len, height, width, 3)).copy()
    frames += _texture(rng, cam_offsets, height, width)[..., None]
    objects = []
    for combo, size, speed, vel, trav, rm in zip(combos, sizes, speeds, img_velocity, travel, room):
        colour, shape, direction, _ = combo
        # Start so that start + v * t stays in [margin, margin + room] for all t.
        lo = _MARGIN + np.where(vel < 0, trav, 0.0)
        hi = _MARGIN + rm - np.where(vel > 0, trav, 0.0)
        start = lo + rng.random(2) * np.maximum(hi - lo, 0.0)  # (2,) (y, x)
        top_left = (start[None] + t[:, None] * vel[None]).astype(np.float32)  # (T, 2)
        alpha = rasterize(shape, size, top_left, height, width)[..., None]  # (T, H, W, 1)
        frames += alpha * (spec.colour_table[colour] - frames)
        objects.append({
            "colour": colour, "shape": shape, "direction": direction, "speed": float(speed),
            "size": float(size), "start": [float(start[0]), float(start[1])],
            "screen_velocity": [float(vel[0]), float(vel[1])],  # px / frame (y, x), camera included
        })
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    meta = {
        "objects": objects, "num_objects": len(objects), "background": bg_name, "camera": camera,
        "camera_speed": float(np.abs(cam_velocity).sum()), "seed": int(seed), "index": int(index),
        "split": split or ("eval" if tuple(combos[0]) in heldout_combos(spec) else "train"),
    }
    return Clip(frames=frames, caption=_caption(rng, combos, camera), meta=meta)


def generate_split(spec: SyntheticSpec, seed: int, split: str, n: int, start: int = 0) -> Iterator[Clip]:
    """Clips `start .. start + n - 1` of `split` ("train" | "eval"); every object's combo is in the split."""
    for index in range(start, start + n):
        yield generate_clip(spec, seed, index, split=split)
