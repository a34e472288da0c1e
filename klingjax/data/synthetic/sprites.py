"""Sprite rasterisation: signed distance (px, negative inside) -> coverage = clip(0.5 - sd, 0, 1).

SDF arguments: dy (T, H, 1), dx (T, 1, W) offsets from the sprite's bbox centre; w, h: bbox size.
"""

from __future__ import annotations

import numpy as np


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


SHAPE_SDFS = {"circle": _sdf_circle, "square": _sdf_square, "triangle": _sdf_triangle}


def sprite_height(shape: str, size: float) -> float:
    """Bbox height of a sprite of bbox width `size` (equilateral triangles are shorter)."""
    return size * np.sqrt(3.0) / 2.0 if shape == "triangle" else size


CENTROID_Y = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}  # area centroid's y / bbox height, per shape


def centroid_offset(shape: str, size: float) -> np.ndarray:
    """(2,) (y, x) from a sprite's bbox top-left to its area centroid."""
    return np.array([CENTROID_Y[shape] * sprite_height(shape, size), 0.5 * size])


def rasterize(shape: str, size: float, top_left: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (T, H, W), of a sprite whose bbox top-left per frame is (T, 2) (y, x)."""
    h = sprite_height(shape, size)
    cy = top_left[:, 0] + 0.5 * h
    cx = top_left[:, 1] + 0.5 * size
    dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - cy[:, None, None]  # (T, H, 1)
    dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - cx[:, None, None]  # (T, 1, W)
    return np.clip(0.5 - SHAPE_SDFS[shape](dy, dx, size, h), 0.0, 1.0).astype(np.float32)
