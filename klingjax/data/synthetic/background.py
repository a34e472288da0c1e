"""Background texture: a faint sum of three sinusoids that moves with the camera."""

from __future__ import annotations

import numpy as np

TEXTURE_AMPLITUDE = 2.5  # per sinusoid; three of them -> at most +-7.5 grey levels


def texture(rng: np.random.Generator, offsets: np.ndarray, height: int, width: int) -> np.ndarray:
    """Faint non-periodic texture (T, H, W) of the scene seen through camera offsets (T, 2) (y, x)."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    tex = np.zeros((len(offsets), height, width), np.float32)
    angles = rng.uniform(0, np.pi, 3) + np.array([0.0, np.pi / 3, 2 * np.pi / 3])
    for angle, wavelength, phase in zip(angles, rng.uniform(5.0, 11.0, 3), rng.uniform(0, 2 * np.pi, 3)):
        fy, fx = np.sin(angle) / wavelength, np.cos(angle) / wavelength
        spatial = 2 * np.pi * (fy * ys + fx * xs) + phase  # (H, W)
        shift = 2 * np.pi * (fy * offsets[:, 0] + fx * offsets[:, 1])  # (T,)
        tex += TEXTURE_AMPLITUDE * np.sin(spatial[None] + shift[:, None, None])
    return tex


def texture_at(rng: np.random.Generator, qy: np.ndarray, qx: np.ndarray, *, amplitude: float = TEXTURE_AMPLITUDE,
               wavelengths: tuple[float, float] = (5.0, 11.0)) -> np.ndarray:
    """The same kind of texture (the draws of `texture`) evaluated at scene coordinates qy, qx (any equal shapes):
    what a camera with zoom and roll sees (synthetic/camera.py); `amplitude` per sinusoid, wavelengths in px."""
    tex = np.zeros(np.shape(qy), np.float32)
    angles = rng.uniform(0, np.pi, 3) + np.array([0.0, np.pi / 3, 2 * np.pi / 3])
    for angle, wavelength, phase in zip(angles, rng.uniform(*wavelengths, 3), rng.uniform(0, 2 * np.pi, 3)):
        fy, fx = np.sin(angle) / wavelength, np.cos(angle) / wavelength
        tex += amplitude * np.sin(2 * np.pi * (fy * qy + fx * qx) + phase).astype(np.float32)
    return tex
