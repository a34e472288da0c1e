"""PSNR / SSIM / LPIPS: closed forms, a scipy SSIM reference (skimage's algorithm), identity and ordering.

Also the one PSNR definition they use (klingjax/measures.py): numpy and jit agree, the cap, the protocol name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from klingjax import measures
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


def test_one_psnr_per_frame_numpy_and_jit_agree_and_cap():
    """Videos in [-1, 1] (data_range 2) whose frames have known constant errors: known dB per frame."""
    errors = np.array([[0.5, 0.25, 0.0], [0.125, 0.5, 0.25]])  # (N=2, T=3): |a - b| of each frame
    a = np.zeros((2, 3, 8, 8, 3), np.float32)
    b = a + errors[:, :, None, None, None].astype(np.float32)
    with np.errstate(divide="ignore"):
        want = 10 * np.log10(4.0 / errors**2)  # inf where the frame is identical
    got = measures.psnr(a, b, data_range=2.0)
    assert isinstance(got, np.ndarray) and got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want)  # [12.04, 18.06, inf], [24.08, 12.04, 18.06]
    capped = measures.psnr(a, b, data_range=2.0, cap=measures.PSNR_CAP)
    assert capped[0, 2] == measures.PSNR_CAP and np.isfinite(capped.mean())
    np.testing.assert_allclose(capped, np.minimum(want, measures.PSNR_CAP))
    jitted = jax.jit(lambda x, y: measures.psnr(x, y, data_range=2.0, cap=measures.PSNR_CAP))(jnp.asarray(a),
                                                                                                jnp.asarray(b))
    assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jitted), capped, rtol=1e-6)
    assert np.isinf(np.asarray(measures.psnr(jnp.asarray(a), jnp.asarray(b), data_range=2.0))[0, 2])
    # uint8 frames (eval, data_range 255) and the same frames in [-1, 1] (training, data_range 2): the same dB.
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 2, 3, 8, 8, 3), dtype=np.uint8)
    to_unit = lambda v: jnp.asarray(v, jnp.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(measures.psnr(to_unit(x), to_unit(y), data_range=2.0)), im.psnr(x, y),
                               rtol=1e-5)
    assert measures.psnr_protocol(4, 9) == "psnr_per_frame_cap100dB_mean_4clips_9f"
    assert measures.psnr_protocol(4, 9, cap=None) == "psnr_per_frame_uncapped_mean_4clips_9f"
    with pytest.raises(ValueError, match="one shape"):
        measures.psnr(a, b[:, :2], data_range=2.0)


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
