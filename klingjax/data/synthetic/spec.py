"""What the synthetic generator draws: `SyntheticSpec`, the `Clip` it returns, default vocabularies."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from klingjax.data.synthetic.camera import MOVES as CAMERA_MOVES
from klingjax.data.synthetic.sprites import SHAPE_SDFS

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
MOTIONS = ("straight", "bounce")
MARGIN = 1.0  # px kept free between a sprite's bbox and the frame border

Combo = tuple[str, str, str, str]  # (colour, shape, direction, background)


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
    # Camera moves (synthetic/camera.py: pan, zoom, roll and pairs of them; per-frame camera paths in the metadata).
    # Off by default; when on, its draws come after every other one, so datasets without it are unchanged.
    p_camera_move: float = 0.0  # P(a clip has a camera move); the rest have a static camera (no pan either)
    camera_moves: tuple[str, ...] = ()  # the moves drawn from (camera.MOVES names); () = all of them
    p_two_moves: float = 0.0  # P(a moving camera combines two moves of different kinds, e.g. pan + zoom)
    move_pan_range: tuple[float, float] = (0.4, 0.8)  # px / frame
    zoom_rate_range: tuple[float, float] = (0.015, 0.03)  # relative scale change / frame
    roll_rate_range: tuple[float, float] = (0.02, 0.04)  # rad / frame
    camera_words: bool = True  # captions name the camera move ("the camera zooms in")
    # The background texture of camera-move clips: stronger and smoother than the default +-7.5 grey levels at 5-11 px,
    # which a 8x spatially compressing VAE (4x4 latents at 32x32) does not reconstruct (the camera would be invisible).
    camera_texture_amplitude: float = 6.0  # per sinusoid: at most +-18 grey levels (below the foreground distance)
    camera_texture_wavelengths: tuple[float, float] = (10.0, 20.0)  # px
    # One fixed texture per background (a "world" every clip of that background is filmed in) instead of a random one
    # per clip: a small DiT learns to render a known world through a camera; a random texture it smears to flat.
    camera_world_texture: bool = False
    # "straight": constant velocity, sprites kept in frame (captions name the direction); "bounce": sprites reflect off
    # the frame edges (synthetic/bounce.py; captions name the axis, "bounces left and right"), for long-video training.
    motion: str = "straight"

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        unknown = set(self.shapes) - set(SHAPE_SDFS)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {sorted(SHAPE_SDFS)}")
        unknown = set(self.directions) - set(DIRECTION_VECTORS)
        if unknown:
            raise ValueError(f"unknown directions {sorted(unknown)}; known: {sorted(DIRECTION_VECTORS)}")
        if self.size_range[1] + 2 * MARGIN >= min(self.height, self.width):
            raise ValueError(f"size_range {self.size_range} does not fit a {self.height}x{self.width} frame")
        if unknown := set(self.camera_moves) - set(CAMERA_MOVES):
            raise ValueError(f"unknown camera moves {sorted(unknown)}; known: {list(CAMERA_MOVES)}")
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
