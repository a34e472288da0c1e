"""Measures shared by training and evaluation: the one PSNR definition and the protocol string naming it.

PSNR is per frame: 10 log10(data_range^2 / MSE), the MSE over a frame's (H, W, C). A clip's or a set's PSNR
is the mean of its per-frame values, each capped at `PSNR_CAP` dB so that one lossless frame (infinite PSNR)
cannot make the mean infinite. The VAE training metric (videos in [-1, 1], data_range 2), its periodic eval
and `klingjax-eval` (uint8 frames, data_range 255) all report this mean, named by `psnr_protocol`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PSNR_CAP = 100.0  # dB; the value of identical frames in reported means


def psnr(a, b, *, data_range: float, cap: float | None = None):
    """PSNR in dB per frame of (..., H, W, C) pairs -> (...); identical frames give inf, or `cap` when set.

    numpy inputs are computed in float64 and give numpy; jax arrays (tracers included, so it runs under jit)
    are computed in at least float32 and give jax arrays.
    """
    xp = jnp if isinstance(a, jax.Array) or isinstance(b, jax.Array) else np
    if np.shape(a) != np.shape(b) or np.ndim(a) < 3:
        raise ValueError(f"PSNR needs two frame sets (..., H, W, C) of one shape, got {np.shape(a)} vs {np.shape(b)}")
    dtype = np.float64 if xp is np else jnp.result_type(a, b, jnp.float32)
    a, b = xp.asarray(a, dtype), xp.asarray(b, dtype)
    mse = xp.mean(xp.square(a - b), axis=(-3, -2, -1))  # (...)
    with np.errstate(divide="ignore"):  # mse == 0: inf, by definition
        value = 10.0 * xp.log10(data_range**2 / mse)
    return value if cap is None else xp.minimum(value, cap)


def psnr_protocol(n_clips: int, n_frames: int, cap: float | None = PSNR_CAP) -> str:
    """The protocol name of a mean of `psnr` over `n_clips` clips of `n_frames` frames, e.g. for reports."""
    capped = f"cap{cap:g}dB" if cap is not None else "uncapped"
    return f"psnr_per_frame_{capped}_mean_{n_clips}clips_{n_frames}f"
