"""`klingjax-eval`: JSON + markdown report + plots on a tiny synthetic set, reference folders and skips.

The scorer and the folder loading it reads are tested in test_scoring.py; the in-loop eval's parity in
test_evaluate.py.
"""

import json

import numpy as np
import pytest

from data_pipelines.make_synthetic import write_synthetic_dataset
from klingjax.data.synthetic import SyntheticSpec, generate_split
from klingjax.eval import cli, media
from klingjax.measures import PSNR_CAP

SPEC = SyntheticSpec(p_two_objects=0.3, p_camera_pan=0.3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A synthetic dataset (4 eval clips) and a folder of "generated" videos: the same clips as .npy files."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(str(root / "ds"), SPEC, 0, 2, 4, 1)
    gen = root / "gen"
    gen.mkdir()
    for i, clip in enumerate(generate_split(SPEC, 0, "eval", 4)):
        np.save(gen / f"clip_{i:02d}.npy", clip.frames)
    return root


def test_dataset_mode_writes_json_report_and_plots(dataset, tmp_path):
    out = tmp_path / "out"
    result = cli.main(["--generated", str(dataset / "gen"), "--dataset", str(dataset / "ds"), "--out", str(out),
                       "--metrics", "psnr,ssim,vbstyle,adherence", "--no_consistency"])
    m = result["metrics"]
    assert m["adherence_all_acc"] == 1.0 and m["adherence_count_acc"] == 1.0 and m["adherence_camera_acc"] == 1.0
    assert m["adherence_all_acc_on_real"] == 1.0  # the detector on the dataset's clips: here the same videos
    assert m["psnr"] == PSNR_CAP and m["ssim"] == pytest.approx(1.0)  # generated == the dataset's eval clips
    assert result["protocols"]["psnr"] == "psnr_per_frame_cap100dB_mean_4clips_17f"
    assert m["temporal_flickering"] == pytest.approx(m["temporal_flickering_on_reference"])
    assert result["protocols"]["temporal_flickering"].startswith("vbench_exact_formula")
    assert result["timings"]["adherence_items_per_s"] > 0 and result["skipped"] == {}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["adherence_all_acc"] == 1.0
    report = (out / "report.md").read_text()
    assert "vbstyle_dynamic_degree" in report and "metrics.png" in report and "samples_grid.png" in report
    for png in ("metrics.png", "samples_grid.png", "reference_grid.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_reference_folder_mode_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    clips = rng.integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    np.save(gen / "all.npy", clips)  # one (N, T, H, W, 3) file
    for i, clip in enumerate(clips):
        media.write_mp4(ref / f"r{i}.mp4", clip, fps=8)
    result = cli.main(["--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "out"),
                       "--metrics", "fvd,psnr,adherence"])
    assert result["num_generated"] == 2 and result["files"] == ["all.npy", "all.npy[1]"]
    assert 5.0 < result["metrics"]["psnr"] < 60.0  # mp4 is lossy
    assert "T >= 9" in result["skipped"]["fvd"] and "--dataset" in result["skipped"]["adherence"]


def test_needs_exactly_one_source(dataset, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="either --reference or --dataset"):
        cli.main(["--generated", str(dataset / "gen"), "--reference", str(dataset / "gen"),
                  "--dataset", str(dataset / "ds"), "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_all_metrics_end_to_end(dataset, tmp_path):
    """The network metrics through the CLI (the Inception consistency dims are unit-tested separately)."""
    result = cli.main(["--generated", str(dataset / "gen"), "--dataset", str(dataset / "ds"),
                       "--out", str(tmp_path / "out"), "--metrics", "fvd,fid,kid,lpips", "--fid_frames", "1"])
    m = result["metrics"]
    assert abs(m["fvd"]) < 1e-6 and abs(m["fid"]) < 1e-6 and abs(m["lpips"]) < 1e-6
    assert result["protocols"]["fvd"] == "fvd4_17f_tf1bilinear224"
    assert result["protocols"]["fid"] == "fid4_inception2015_tf_legacy299_1fpc"
    assert result["timings"]["inception_fake_items_per_s"] > 0 and result["skipped"] == {}
