"""PSNR / SSIM / LPIPS: closed forms, a scipy SSIM reference (skimage's algorithm), identity and ordering."""

import numpy as np
import pytest
from scipy import ndimage

from klingjax.eval import image_metrics as im


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False), float64."""
    out = []
    for c in range(3):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5)
        ua, ub = f(a), f(b)
        va, vb, cov = f(a * a) - ua * ua, f(b * b) - ub * ub, f(a * b) - ua * ub
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
        out.append(s[5:-5, 5:-5].mean())
    return float(np.mean(out))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 40, 48, 3), dtype=np.uint8)  # (N, T, H, W, 3)
    b = np.clip(a.astype(np.int32) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_closed_form_and_identity():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    assert im.psnr(a, a + 10)[0] == pytest.approx(10 * np.log10(255**2 / 100.0))
    assert np.isinf(im.psnr(a, a)[0])


def test_ssim_matches_reference_and_keeps_leading_dims(pair):
    a, b = pair
    got = im.ssim(a, b)
    assert got.shape == (2, 3)
    assert got[1, 2] == pytest.approx(_ssim_reference(a[1, 2], b[1, 2]), abs=1e-5)
    np.testing.assert_allclose(im.ssim(a, a), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        im.ssim(a[..., :8, :8, :], b[..., :8, :8, :])


def test_lpips_identity_and_ordering(pair):
    a, b = pair
    same, near = im.lpips(a, a), im.lpips(a, b)
    assert same.shape == (2, 3) and np.abs(same).max() < 1e-6
    far = im.lpips(a, np.full_like(a, 128))
    assert (near > 1e-3).all() and (far > near).all()


def test_bad_inputs_raise_clear_errors(pair, monkeypatch):
    a, b = pair
    with pytest.raises(ValueError, match="differ in shape"):
        im.psnr(a, b[:, :2])
    nan = a.astype(np.float32)
    nan[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        im.ssim(nan, a)
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        im.load_lpips_params("squeeze")
    im.load_lpips_params.cache_clear()
    monkeypatch.setitem(im.LPIPS_SHA256, "alexnet", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        im.load_lpips_params("alexnet")
    im.load_lpips_params.cache_clear()
