"""The in-loop eval (klingjax/eval/evaluate.py): its written videos scored by `klingjax-eval` give its numbers."""

import json
import os

import numpy as np
import pytest

from data_pipelines.make_synthetic import write_synthetic_dataset
from experiments import demo
from klingjax.config import to_experiment
from klingjax.data.synthetic import SyntheticSpec
from klingjax.eval import cli, evaluate, scoring


class FixedGenerator:
    """Stands in for `VideoGenerator`: returns fixed uint8 clips, one per caption, in caption order."""

    def __init__(self, videos: np.ndarray, captions: list[str]):
        self.videos, self.captions = videos, captions

    def __call__(self, captions, key, *, batch_size: int = 16) -> np.ndarray:
        assert list(captions) == self.captions[: len(captions)]
        return self.videos[: len(captions)]


def _experiment(fvd: bool):
    c = demo.get_config("runlocal")  # 9 frames of 32x32
    c.eval.num_clips, c.eval.fvd, c.sample.num_samples = 4, fvd, 2
    return to_experiment(c)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A synthetic dataset of the experiment's clip size (4 held-out clips), written as `run_data` writes it."""
    d = _experiment(False).data
    spec = SyntheticSpec(num_frames=d.num_frames, height=d.height, width=d.width, heldout_fraction=d.heldout_fraction,
                         size_range=tuple(d.sprite_size), speed_range=tuple(d.speed_range), p_two_objects=0.3)
    out = str(tmp_path_factory.mktemp("synth") / "data")
    write_synthetic_dataset(out, spec, 0, 2, 4, 1)
    return out


def _run_both(exp, videos, captions, data_dir, tmp_path, metrics: str):
    """The in-loop eval of `videos`, then `klingjax-eval` on the folder it wrote -> (in-loop, CLI) results."""
    out = str(tmp_path / "workdir")
    got = evaluate.evaluate(exp, FixedGenerator(videos, captions), data_dir=data_dir, out_dir=out)
    folder = os.path.join(out, "eval", "generated")
    np.testing.assert_array_equal(np.load(os.path.join(folder, "videos.npy")), videos)
    result = cli.main(["--generated", folder, "--dataset", data_dir, "--out", str(tmp_path / "cli"),
                       "--metrics", metrics])
    return out, got, result


@pytest.mark.parametrize("name", ["ground_truth", "reversed"])
def test_in_loop_eval_equals_klingjax_eval_on_its_folder(data_dir, tmp_path, name):
    exp = _experiment(False)
    real, captions, _ = evaluate.load_eval_clips(exp, data_dir, exp.eval.num_clips)
    videos = real if name == "ground_truth" else real[::-1].copy()
    out, got, result = _run_both(exp, videos, captions, data_dir, tmp_path, "adherence")

    assert result["metrics"] == got  # the same scorer on the same (losslessly stored) videos: identical values
    keys = [f"adherence_{k}{tag}" for k in scoring.ADHERENCE_KEYS for tag in ("", "_on_real")]
    assert sorted(got) == sorted(keys)
    assert all(got[f"adherence_{k}_on_real"] == 1.0 for k in scoring.ADHERENCE_KEYS)  # the detector's ceiling
    if name == "ground_truth":  # the ground-truth clips as samples score exactly the ceiling
        assert all(got[f"adherence_{k}"] == got[f"adherence_{k}_on_real"] for k in scoring.ADHERENCE_KEYS)
    else:
        assert got["adherence_all_acc"] < got["adherence_all_acc_on_real"]

    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["metrics"] == got and saved["protocols"] == result["protocols"] and saved["skipped"] == {}
    with open(os.path.join(out, "eval", "generated", "prompts.txt")) as f:
        assert f.read().splitlines() == captions
    report = open(os.path.join(out, "report.md")).read()
    assert report.startswith("# klingjax report: demo_runlocal\n") and "adherence_colour_acc_on_real" in report
    for file in ("samples_grid.png", "real_grid.png", "sample_00.mp4", "sample_01.gif", "report.md"):
        assert os.path.getsize(os.path.join(out, file)) > 0
    assert not os.path.exists(os.path.join(out, "sample_02.mp4"))  # sample.num_samples = 2


@pytest.mark.slow
def test_in_loop_fvd_equals_klingjax_eval(data_dir, tmp_path):
    exp = _experiment(True)
    real, captions, _ = evaluate.load_eval_clips(exp, data_dir, exp.eval.num_clips)
    _, got, result = _run_both(exp, real[::-1].copy(), captions, data_dir, tmp_path, "adherence,fvd")
    assert result["metrics"] == got and abs(got["fvd"]) < 1e-3  # the same set, reordered
    assert result["protocols"]["fvd"] == "fvd4_9f_tf1bilinear224"
