"""The one scorer (klingjax/eval/scoring.py): generated-video folders, the metric table, skips and bad inputs."""

import numpy as np
import pytest

from klingjax.data.synthetic import SyntheticSpec, generate_split
from klingjax.eval import scoring
from klingjax.measures import PSNR_CAP

SPEC = SyntheticSpec(num_frames=5, p_two_objects=0.3)


@pytest.fixture(scope="module")
def clips():
    """4 synthetic clips uint8 (4, 5, 32, 32, 3) and their ground-truth metas."""
    split = list(generate_split(SPEC, 0, "eval", 4))
    return np.stack([c.frames for c in split]), [c.meta for c in split], [c.caption for c in split]


def test_write_generated_round_trips_losslessly(clips, tmp_path):
    videos, _, captions = clips
    folder = scoring.write_generated(tmp_path / "gen", videos, captions)
    loaded, names = scoring.load_video_folder(folder)
    np.testing.assert_array_equal(loaded, videos)
    assert loaded.dtype == np.uint8 and names == ["videos.npy"] + [f"videos.npy[{i}]" for i in range(1, 4)]
    assert (tmp_path / "gen" / "prompts.txt").read_text().splitlines() == captions
    with pytest.raises(ValueError, match="uint8 videos"):
        scoring.write_generated(tmp_path / "bad", videos.astype(np.float32), captions)
    with pytest.raises(ValueError, match="for 3 captions"):
        scoring.write_generated(tmp_path / "bad", videos, captions[:3])


def test_adherence_scores_generated_and_reference(clips):
    """Ground-truth clips score 1 against their own metas; other clips score lower, the reference's ceiling stays."""
    videos, metas, _ = clips
    same = scoring.compute_metrics(videos, videos, ["adherence"], metas=metas, spec=SPEC)
    for key in scoring.ADHERENCE_KEYS:
        assert same.values[f"adherence_{key}"] == same.values[f"adherence_{key}_on_real"] == 1.0
    assert "ground-truth clips" in same.protocols["adherence_all_acc_on_real"]
    assert same.timings["adherence_on_real_items_per_s"] > 0 and same.skipped == {}
    other = scoring.compute_metrics(videos[::-1], videos, ["adherence"], metas=metas, spec=SPEC)
    assert other.values["adherence_all_acc"] < 1.0 and other.values["adherence_all_acc_on_real"] == 1.0
    no_ref = scoring.compute_metrics(videos, None, ["adherence"], metas=metas, spec=SPEC)
    assert "adherence_all_acc" in no_ref.values and "adherence_all_acc_on_real" not in no_ref.values
    # The VAE's reconstructions are a third set: its adherence (any DiT's ceiling) and PSNR vs the reference.
    noisy = videos.copy()
    noisy[0, 0] ^= 1  # one frame off by one grey level (MSE 1), the other 19 identical
    on_vae = scoring.compute_metrics(videos[::-1], videos, ["adherence"], metas=metas, spec=SPEC, recon=noisy)
    assert on_vae.values["adherence_all_acc_on_vae"] == 1.0 > on_vae.values["adherence_all_acc"]
    assert on_vae.values["vae_psnr"] == pytest.approx((10 * np.log10(255.0**2) + 19 * PSNR_CAP) / 20)
    assert "reconstructions" in on_vae.protocols["adherence_shape_acc_on_vae"]


def test_paired_psnr_is_the_capped_per_frame_mean(clips):
    videos, _, _ = clips
    noisy = videos.copy()
    noisy[0, 0] ^= 1  # one frame off by one grey level everywhere (MSE 1); the other 19 frames are identical
    scores = scoring.compute_metrics(noisy, videos, ["psnr", "ssim"])
    assert scores.values["psnr"] == pytest.approx((10 * np.log10(255.0**2) + 19 * PSNR_CAP) / 20)
    assert scores.protocols["psnr"] == "psnr_per_frame_cap100dB_mean_4clips_5f"
    assert 0.99 < scores.values["ssim"] <= 1.0


def test_skips_say_why_and_bad_inputs_raise(clips, tmp_path):
    videos, _, _ = clips
    scores = scoring.compute_metrics(videos, None, ["fvd", "psnr", "adherence"])
    assert set(scores.skipped) == {"fvd", "psnr", "adherence"} and scores.values == {}
    assert "--dataset" in scores.skipped["adherence"] and "reference" in scores.skipped["fvd"]
    assert "T >= 9" in scoring.compute_metrics(videos, videos, ["fvd"]).skipped["fvd"]
    assert "same shape" in scoring.compute_metrics(videos, videos[:2], ["ssim"]).skipped["ssim"]
    with pytest.raises(ValueError, match="unknown metrics"):
        scoring.compute_metrics(videos, None, ["fvd", "clipscore"])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no videos"):
        scoring.load_video_folder(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(mixed / "b.npy", np.zeros((4, 8, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="mixed shapes"):
        scoring.load_video_folder(mixed)
    nan = tmp_path / "nan"
    nan.mkdir()
    bad = np.zeros((4, 8, 8, 3), np.float32)
    bad[1, 2, 3, 0] = np.nan
    np.save(nan / "a.npy", bad)
    with pytest.raises(ValueError, match="NaN"):
        scoring.load_video_folder(nan)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scoring.load_video_folder(tmp_path / "missing")
