"""Camera moves of the synthetic renderer: one documented convention, used by the renderer, the camera condition,
the estimator and `klingjax-generate --camera`.

Image axes: y grows downwards, x to the right; pixel (i, j) has its centre at (y, x) = (i + 0.5, j + 0.5) and the
image centre is c = (H / 2, W / 2). The scene is a plane whose coordinates are the output image's px at frame 0.

A camera path is one row per frame, `(oy, ox, log_scale, roll)` (a `CAMERA_DIMS`-vector), relative to frame 0 (row 0
is zero): the camera centre's position in the scene (px), the log of the magnification, and the camera's roll angle
(radians). A scene point q is seen at

    p = c + s R(-roll) (q - c - o),     s = exp(log_scale),   R(a) = [[cos a, -sin a], [sin a, cos a]] on (x, y)

so (checked against the renderer in tests/data/test_camera.py):
  * pan_left / pan_right / pan_up / pan_down (value: px / frame): the camera moves that way; the scene's content moves
    the opposite way on screen (pan_left: content moves right);
  * zoom_in / zoom_out (value: relative scale change per frame, e.g. 0.02 = 2%): zoom_in magnifies the content
    about the image centre (log_scale grows by log(1 + value) per frame; zoom_out by -log(1 + value));
  * roll_cw / roll_ccw (value: radians / frame): the camera rolls clockwise as the viewer sees it, so the content
    turns counter-clockwise on screen (a point above the centre moves left).
Several moves combine (their rates add: "pan_left:0.5,zoom_in:0.02"). Rates are constant over a clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

CAMERA_DIMS = 4  # (oy, ox, log_scale, roll) per frame
# Move name -> (row component, sign): pan components are (dy, dx) unit vectors of the camera's motion.
PAN_MOVES = {"pan_left": (0.0, -1.0), "pan_right": (0.0, 1.0), "pan_up": (-1.0, 0.0), "pan_down": (1.0, 0.0)}
ZOOM_MOVES = {"zoom_in": 1.0, "zoom_out": -1.0}
ROLL_MOVES = {"roll_cw": 1.0, "roll_ccw": -1.0}
MOVES = (*PAN_MOVES, *ZOOM_MOVES, *ROLL_MOVES)
# Caption words per move (text-only camera control reads these).
CAPTION_WORDS = {"pan_left": "the camera pans left", "pan_right": "the camera pans right",
                 "pan_up": "the camera pans up", "pan_down": "the camera pans down",
                 "zoom_in": "the camera zooms in", "zoom_out": "the camera zooms out",
                 "roll_cw": "the camera rolls clockwise", "roll_ccw": "the camera rolls counter-clockwise"}
MAX_RATE = {"pan": 4.0, "zoom": 0.1, "roll": 0.2}  # px / frame, relative scale / frame, rad / frame


def move_kind(name: str) -> str:
    """"pan", "zoom" or "roll" for a move name (ValueError naming the known moves otherwise)."""
    if name in PAN_MOVES:
        return "pan"
    if name in ZOOM_MOVES:
        return "zoom"
    if name in ROLL_MOVES:
        return "roll"
    raise ValueError(f"unknown camera move {name!r}; known moves: {', '.join(MOVES)}")


def rates(moves: Mapping[str, float]) -> np.ndarray:
    """Per-frame rates (vy, vx, dlog_scale, droll) of a combination of moves {name: value}; validated."""
    out = np.zeros(CAMERA_DIMS, np.float64)
    for name, value in moves.items():
        kind = move_kind(name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"camera move {name}: value must be a finite number >= 0, got {value}")
        if value > MAX_RATE[kind]:
            raise ValueError(f"camera move {name}: {value} is more than the largest {kind} rate {MAX_RATE[kind]}")
        if kind == "pan":
            out[:2] += value * np.asarray(PAN_MOVES[name])
        elif kind == "zoom":
            out[2] += ZOOM_MOVES[name] * math.log1p(value)
        else:
            out[3] += ROLL_MOVES[name] * value
    return out


def path_from_rates(rate: np.ndarray, num_frames: int) -> np.ndarray:
    """Camera path (num_frames, 4) of constant per-frame `rate` (vy, vx, dlog_scale, droll)."""
    return np.arange(num_frames, dtype=np.float64)[:, None] * np.asarray(rate, np.float64)[None]


def camera_path(moves: Mapping[str, float], num_frames: int) -> np.ndarray:
    """Camera path (num_frames, 4) of a combination of moves, e.g. {"pan_left": 0.5, "zoom_in": 0.02}."""
    return path_from_rates(rates(moves), num_frames)


def parse_moves(text: str) -> dict[str, float]:
    """"pan_left:0.5,zoom_in:0.02" -> {"pan_left": 0.5, "zoom_in": 0.02} (ValueError naming the bad part)."""
    moves: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition(":")
        move_kind(name)
        if not sep:
            raise ValueError(f"camera move {part!r}: expected NAME:VALUE, e.g. pan_left:0.5")
        if name in moves:
            raise ValueError(f"camera move {name} given twice")
        try:
            moves[name] = float(value)
        except ValueError:
            raise ValueError(f"camera move {part!r}: {value!r} is not a number") from None
    rates(moves)  # range checks
    return moves


def check_path(path: np.ndarray, num_frames: int) -> np.ndarray:
    """A camera path as float64 (num_frames, 4), finite, row 0 zero (ValueError naming what is wrong)."""
    path = np.asarray(path, np.float64)
    if path.shape != (num_frames, CAMERA_DIMS):
        raise ValueError(f"camera path must have one (oy, ox, log_scale, roll) row per frame: shape ({num_frames}, "
                         f"{CAMERA_DIMS}), got {path.shape}")
    if not np.isfinite(path).all():
        raise ValueError("camera path holds NaN or Inf")
    if np.abs(path[0]).max() > 1e-9:
        raise ValueError(f"camera path row 0 must be zero (the path is relative to frame 0), got {path[0].tolist()}")
    return path


def _rot(angle: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R(angle) applied to (x, y) (angle broadcast against y, x); returns (y', x')."""
    c, s = np.cos(angle), np.sin(angle)
    return s * x + c * y, c * x - s * y


def scene_of_pixels(path: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene coordinates (qy, qx), each (T, H, W), of every pixel centre of every frame of `path` (T, 4)."""
    cy, cx = height / 2.0, width / 2.0
    py = (np.arange(height, dtype=np.float64) + 0.5 - cy)[None, :, None]
    px = (np.arange(width, dtype=np.float64) + 0.5 - cx)[None, None, :]
    o, s, roll = path[:, :2], np.exp(path[:, 2]), path[:, 3]
    ry, rx = _rot(roll[:, None, None], py / s[:, None, None], px / s[:, None, None])  # q - c - o = R(roll)(p - c)/s
    return cy + o[:, 0, None, None] + ry, cx + o[:, 1, None, None] + rx


def screen_of_scene(path: np.ndarray, qy: np.ndarray, qx: np.ndarray, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """Screen positions (py, px), each (T,), of scene points (qy, qx) (T,) seen through `path` (T, 4)."""
    cy, cx = height / 2.0, width / 2.0
    o, s, roll = path[:, :2], np.exp(path[:, 2]), path[:, 3]
    ry, rx = _rot(-roll, qy - cy - o[:, 0], qx - cx - o[:, 1])
    return cy + s * ry, cx + s * rx


def move_names(rate: np.ndarray, *, pan_eps: float = 1e-9, zoom_eps: float = 1e-9,
               roll_eps: float = 1e-9) -> list[str]:
    """The moves of a rate vector (vy, vx, dlog_scale, droll) as names (dominant pan axis only), sorted pan, zoom,
    roll; [] = static."""
    vy, vx, z, r = (float(v) for v in rate)
    names = []
    if max(abs(vy), abs(vx)) > pan_eps:
        names.append(("pan_down" if vy > 0 else "pan_up") if abs(vy) > abs(vx) else
                     ("pan_right" if vx > 0 else "pan_left"))
    if abs(z) > zoom_eps:
        names.append("zoom_in" if z > 0 else "zoom_out")
    if abs(r) > roll_eps:
        names.append("roll_cw" if r > 0 else "roll_ccw")
    return names


def latent_frame_rows(num_frames: int, temporal_factor: int) -> np.ndarray:
    """The pixel frame each latent frame's camera row is taken at: latent frame 0 = frame 0, latent frame k >= 1
    covers frames (k - 1) f + 1 .. k f of a causal VAE with temporal factor f, and reads its last one."""
    t_latent = 1 + (num_frames - 1) // temporal_factor
    return np.minimum(np.arange(t_latent) * temporal_factor, num_frames - 1)


def camera_condition(meta: dict, rows: tuple[int, ...]) -> np.ndarray:
    """`Conditions.camera` (t, 4) float32 of a clip: its camera path (metadata `camera_path`; none: a static camera)
    at the pixel frames `rows` (`latent_frame_rows`)."""
    path = meta.get("camera_path")
    path = np.zeros((max(rows) + 1, CAMERA_DIMS)) if not path else np.asarray(path)
    return path[np.asarray(rows)].astype(np.float32)
