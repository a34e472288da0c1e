"""VBench-style dimensions: VBench's flicker formula, DIS dynamic degree thresholds, smoothness, consistency."""

import numpy as np
import pytest
from scipy import ndimage

from klingjax.eval import vbench_style as vb


@pytest.fixture(scope="module")
def texture():
    """A smooth random grey texture (300, 420) in [0, 255] to translate under a fixed window."""
    t = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(300, 420)), 3.0)
    return (t - t.min()) / (t.max() - t.min()) * 255.0


def _panning(texture, px_per_frame: int, frames: int = 16, size: int = 224) -> np.ndarray:
    """uint8 (T, size, size, 3): a window sliding right over the texture by `px_per_frame` per frame."""
    crops = [texture[20 : 20 + size, 10 + px_per_frame * t : 10 + px_per_frame * t + size] for t in range(frames)]
    return np.repeat(np.rint(np.stack(crops))[..., None], 3, -1).astype(np.uint8)


def test_temporal_flickering_formula():
    static = np.full((5, 8, 8, 3), 77, np.uint8)
    assert vb.temporal_flickering(static) == 1.0
    blink = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 51, np.uint8)] * 2)  # MAE 51 per pair
    assert vb.temporal_flickering(blink) == pytest.approx((255 - 51) / 255)
    with pytest.raises(ValueError, match="at least 2 frames"):
        vb.temporal_flickering(static[:1])


def test_dynamic_degree_vbench_thresholds(texture):
    assert vb.vbstyle_dynamic_degree(_panning(texture, 2)) is False  # threshold 6 * 224 / 256 = 5.25 px
    assert vb.vbstyle_dynamic_degree(_panning(texture, 8)) is True
    assert vb.vbstyle_dynamic_degree(_panning(texture, 0)) is False


def test_dis_flow_recovers_translation(texture):
    video = _panning(texture, 3, frames=2)
    flow = vb.dis_flow(video[0], video[1])
    assert np.median(flow[..., 0]) == pytest.approx(-3.0, abs=0.05)  # content moves left as the window pans right
    assert abs(np.median(flow[..., 1])) < 0.05


def test_motion_smoothness_prefers_smooth_motion(texture):
    smooth = vb.vbstyle_motion_smoothness(_panning(texture, 4, frames=5))
    noise = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    assert smooth > 0.99 and vb.vbstyle_motion_smoothness(noise) < 0.8
    assert vb.vbstyle_motion_smoothness(np.full((3, 16, 16, 3), 9, np.uint8)) == 1.0


def test_consistency_formula():
    f = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # t=1: (1 + 1) / 2; t=2: (0 + 0) / 2; t=3: (max(0, 0) + max(0, -1)) / 2
    assert vb.consistency_from_features(f) == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match="T >= 2"):
        vb.consistency_from_features(f[:1])


def test_inception_consistency_of_static_video_is_one(monkeypatch, tmp_path):
    monkeypatch.setenv("KLINGJAX_CACHE", str(tmp_path))
    frame = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    scores = vb.vbstyle_consistency(np.stack([frame, frame])[None], batch_size=2)  # (1, 2, 299, 299, 3)
    assert scores["vbstyle_subject_consistency"][0] == pytest.approx(1.0, abs=1e-6)
    assert scores["vbstyle_background_consistency"][0] == pytest.approx(1.0, abs=1e-6)


def test_border_ring_fills_centre():
    frames = np.zeros((1, 8, 8, 3), np.uint8)
    frames[:, 3:5, 3:5] = 255  # a bright centre, black ring
    out = vb.border_ring(frames)
    assert out.dtype == np.uint8 and out.max() == 0


def test_exact_vbench_needs_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vb.check_vbench_weights(tmp_path / "nope", ["dynamic_degree"])
    with pytest.raises(FileNotFoundError, match=r"raft_model/models/raft-things\.pth"):
        vb.run_exact_vbench(tmp_path, ["dynamic_degree"], tmp_path)
    with pytest.raises(ValueError, match="unknown VBench dimensions"):
        vb.check_vbench_weights(tmp_path, ["aesthetics"])
    (tmp_path / "raft_model" / "models").mkdir(parents=True)
    (tmp_path / "raft_model" / "models" / "raft-things.pth").write_bytes(b"")
    assert vb.check_vbench_weights(tmp_path, ["dynamic_degree", "temporal_flickering"]) == tmp_path
