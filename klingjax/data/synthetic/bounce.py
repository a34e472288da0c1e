"""Bouncing sprites: clips of any length whose sprites reflect off the frame edges, rendered window by window.

A sprite moves along one axis (its direction's) at constant speed and reflects elastically at the frame edges: its
bbox top-left along that axis is a triangle wave between `lo = MARGIN` and `hi = MARGIN + room` (room = frame side -
2 MARGIN - sprite extent). `reflect` evaluates it exactly at any (real) time and `bounces` lists every reflection, so
the ground truth of a minutes-long clip is closed-form: nothing of it is stored but a few numbers.

`LongClip` is such a clip of any length (e.g. 2 minutes at the data's fps), rendered on the fly by `frames(start,
stop)` (never as one huge array); `window_clip` is a training clip: a random window of a bouncing track, captioned
with the axis of motion ("a red circle bounces left and right"). A static camera (pans of long clips are left out).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klingjax.data.synthetic.background import texture
from klingjax.data.synthetic.combos import heldout_combos, sample_combos
from klingjax.data.synthetic.spec import DIRECTION_VECTORS, MARGIN, SPLITS, Clip, Combo, SyntheticSpec
from klingjax.data.synthetic.sprites import centroid_offset, rasterize, sprite_height

AXIS_WORDS = {"left": "left and right", "right": "left and right", "up": "up and down", "down": "up and down"}
BOUNCE_TEMPLATES = (
    "a {colour} {shape} bounces {axis} on a {background} background",
    "a {colour} {shape} bouncing {axis} on a {background} background",
)


def reflect(start: float, velocity: float, lo: float, hi: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, velocity) at times t of a point starting at `start` in [lo, hi] with `velocity` that reflects off
    lo and hi: position = lo + triangle wave of period 2 (hi - lo) / |velocity|."""
    span = hi - lo
    if span <= 0:
        return np.full(np.shape(t), float(lo)), np.zeros(np.shape(t))
    phase = np.mod(start - lo + velocity * np.asarray(t, np.float64), 2 * span)  # unfolded distance, folded
    forward = phase < span
    return lo + np.where(forward, phase, 2 * span - phase), np.where(forward, velocity, -velocity)


def bounces(start: float, velocity: float, lo: float, hi: float, t_end: float) -> list[tuple[float, str]]:
    """Every reflection in (0, t_end): (time in frames, "lo" | "hi"), in order."""
    span = hi - lo
    if span <= 0 or velocity == 0:
        return []
    u0, out = start - lo, []
    # The unfolded coordinate u0 + v t crosses k * span at t = (k span - u0) / v; even k: the lo edge, odd: hi.
    ks = np.arange(np.ceil(min(u0, u0 + velocity * t_end) / span), np.floor(max(u0, u0 + velocity * t_end) / span) + 1)
    for k in ks:
        t = (k * span - u0) / velocity
        if 0 < t < t_end:
            out.append((float(t), "lo" if int(k) % 2 == 0 else "hi"))
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class Sprite:
    """One bouncing sprite: combo, bbox size, top-left at frame 0 and velocity (px / frame) along `axis` (0 = y,
    1 = x), reflecting between lo and hi (top-left coordinate along the axis)."""

    colour: str
    shape: str
    direction: str  # the direction at frame 0
    size: float
    start: tuple[float, float]  # (y, x) top-left at frame 0
    speed: float
    lo: float
    hi: float

    @property
    def axis(self) -> int:
        return 0 if DIRECTION_VECTORS[self.direction][0] else 1

    @property
    def velocity(self) -> float:
        return self.speed * sum(DIRECTION_VECTORS[self.direction])

    def top_left(self, t: np.ndarray) -> np.ndarray:
        """(T, 2) (y, x) bbox top-left at frames t."""
        pos, _ = reflect(self.start[self.axis], self.velocity, self.lo, self.hi, t)
        out = np.broadcast_to(np.asarray(self.start, np.float64), (len(t), 2)).copy()
        out[:, self.axis] = pos
        return out

    def centroid(self, t: np.ndarray) -> np.ndarray:
        """(T, 2) (y, x) true area centroid at frames t."""
        return self.top_left(t) + centroid_offset(self.shape, self.size)

    def directions(self, t: np.ndarray) -> list[str]:
        """The direction word at each frame in t (it flips at every bounce)."""
        _, v = reflect(self.start[self.axis], self.velocity, self.lo, self.hi, t)
        words = ("up", "down") if self.axis == 0 else ("left", "right")
        return [words[int(x > 0)] for x in v]

    def bounces(self, num_frames: float) -> list[tuple[float, str]]:
        return bounces(self.start[self.axis], self.velocity, self.lo, self.hi, num_frames)

    def to_meta(self, num_frames: int) -> dict:
        return {"colour": self.colour, "shape": self.shape, "direction": self.direction, "size": self.size,
                "start": list(self.start), "speed": self.speed, "axis": "yx"[self.axis], "lo": self.lo,
                "hi": self.hi, "bounces": [[round(t, 4), edge] for t, edge in self.bounces(num_frames)]}


def _draw(spec: SyntheticSpec, rng: np.random.Generator, combos: list[Combo]) -> list[Sprite]:
    """Sizes, speeds and frame-0 positions of bouncing sprites for `combos` (any position on the track)."""
    sizes = rng.uniform(*spec.size_range, len(combos))
    speeds = rng.uniform(*spec.speed_range, len(combos))
    out = []
    for (colour, shape, direction, _), size, speed in zip(combos, sizes, speeds):
        extent = np.array([sprite_height(shape, size), size])
        room = np.maximum(np.array([spec.height, spec.width]) - 2 * MARGIN - extent, 0.0)
        start = MARGIN + rng.random(2) * room  # (y, x); the axis coordinate anywhere on its track
        axis = 0 if DIRECTION_VECTORS[direction][0] else 1
        out.append(Sprite(colour, shape, direction, float(size), (float(start[0]), float(start[1])), float(speed),
                          float(MARGIN), float(MARGIN + room[axis])))
    return out


def _caption(rng: np.random.Generator, sprites: list[Sprite], background: str) -> str:
    parts = [BOUNCE_TEMPLATES[rng.integers(len(BOUNCE_TEMPLATES))].format(
        colour=s.colour, shape=s.shape, axis=AXIS_WORDS[s.direction], background=background).split(" on a ")[0]
        for s in sprites]
    return " and ".join(parts) + f" on a {background} background"


@dataclasses.dataclass(frozen=True)
class LongClip:
    """A bouncing-sprite clip of `num_frames` frames (any length), rendered window by window."""

    spec: SyntheticSpec
    num_frames: int
    background: str
    sprites: tuple[Sprite, ...]
    caption: str
    texture: np.ndarray  # (H, W) float32, static camera
    seed: int
    index: int
    split: str

    @property
    def meta(self) -> dict:
        """JSON-serialisable ground truth: per-sprite tracks (closed form) and every bounce."""
        return {"objects": [s.to_meta(self.num_frames) for s in self.sprites], "num_objects": len(self.sprites),
                "background": self.background, "camera": "static", "num_frames": self.num_frames,
                "fps": self.spec.fps, "seed": self.seed, "index": self.index, "split": self.split}

    def background_frame(self) -> np.ndarray:
        """uint8 (H, W, 3): the background alone (what every frame shows outside the sprites)."""
        bg = self.spec.background_table[self.background][None, None] + self.texture[..., None]
        return np.clip(np.rint(bg), 0, 255).astype(np.uint8)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, H, W, 3): frames [start, stop) of the clip."""
        if not 0 <= start <= stop <= self.num_frames:
            raise ValueError(f"frames [{start}, {stop}) outside the clip's {self.num_frames}")
        t = np.arange(start, stop, dtype=np.float64)
        h, w = self.spec.height, self.spec.width
        frames = np.broadcast_to(self.spec.background_table[self.background] + self.texture[..., None],
                                 (len(t), h, w, 3)).astype(np.float32)
        for s in self.sprites:
            alpha = rasterize(s.shape, s.size, s.top_left(t).astype(np.float32), h, w)[..., None]
            frames = frames + alpha * (self.spec.colour_table[s.colour] - frames)
        return np.clip(np.rint(frames), 0, 255).astype(np.uint8)

    def windows(self, length: int):
        """Consecutive windows of `length` frames (the last may be shorter): (start, uint8 frames)."""
        for start in range(0, self.num_frames, length):
            yield start, self.frames(start, min(start + length, self.num_frames))


def long_clip(spec: SyntheticSpec, seed: int, index: int, num_frames: int, split: str = "eval") -> LongClip:
    """Long clip `index` of stream `seed` on `split`'s combos (deterministic): e.g. 2 minutes = 120 * spec.fps."""
    rng = np.random.default_rng([seed, index, SPLITS[split], 7])  # 7: the long-clip stream
    combos = sample_combos(spec, rng, split)
    sprites = _draw(spec, rng, combos)
    tex = texture(rng, np.zeros((1, 2)), spec.height, spec.width)[0]
    return LongClip(spec, int(num_frames), combos[0][3], tuple(sprites), _caption(rng, sprites, combos[0][3]), tex,
                    int(seed), int(index), split)


def window_clip(spec: SyntheticSpec, rng: np.random.Generator, combos: list[Combo], seed: int, index: int,
                split: str | None) -> Clip:
    """A training clip of `spec.num_frames` frames: bouncing sprites at a random point of their tracks."""
    sprites = _draw(spec, rng, combos)
    background = combos[0][3]
    tex = texture(rng, np.zeros((1, 2)), spec.height, spec.width)[0]
    split_name = split or ("eval" if tuple(combos[0]) in heldout_combos(spec) else "train")
    clip = LongClip(spec, spec.num_frames, background, tuple(sprites), _caption(rng, sprites, background), tex,
                    int(seed), int(index), split_name)
    meta = clip.meta
    t = np.arange(spec.num_frames, dtype=np.float64)
    for obj, s in zip(meta["objects"], sprites):
        track = s.top_left(t)
        net = track[-1] - track[0]  # what a least-squares detector sees: the net motion's sign along the axis
        words = ("up", "down") if s.axis == 0 else ("left", "right")
        obj["direction"] = words[int(net[s.axis] > 0)] if abs(net[s.axis]) > 0 else s.direction
        obj["screen_velocity"] = [float(v) for v in np.polyfit(t, track, 1)[0]] if len(t) > 1 else [0.0, 0.0]
    return Clip(frames=clip.frames(0, spec.num_frames), caption=clip.caption, meta=meta)
