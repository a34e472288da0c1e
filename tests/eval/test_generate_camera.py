"""`klingjax-generate --camera / --camera_path`: parsed to one camera row per latent frame in camera.py's convention,
refused with a clear message for a DiT without a camera adapter, a bad move or a path of the wrong length."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import demo
from klingjax.config import to_experiment
from klingjax.data.synthetic import camera as cam
from klingjax.eval import generate_cli


def _exp(camera: str | None):
    c = demo.get_config("runlocal")
    if camera:
        c.dit.model_overrides = {**c.dit.model_overrides, "conditions": {"camera": camera}}
    return to_experiment(c)


def _plan(exp, *flags):
    args = generate_cli.parse_args(["--checkpoint", "/nowhere", "--out", "/tmp/x.mp4", "--prompt", "a red circle",
                                    "--fps", "8", *flags])
    generate_cli.check_flags(args)
    return generate_cli.plan(args, exp)


def test_moves_become_one_row_per_latent_frame():
    req = _plan(_exp("all_blocks"), "--camera", "pan_left:0.5,zoom_in:0.02")
    path = cam.camera_path({"pan_left": 0.5, "zoom_in": 0.02}, 9)
    np.testing.assert_allclose(req.camera, path[[0, 4, 8]], rtol=1e-6)  # demo: 9 frames, temporal factor 4
    assert req.mode == "text" and _plan(_exp("all_blocks")).camera is None


def test_a_path_file_is_read_and_checked(tmp_path):
    path = cam.camera_path({"roll_cw": 0.03}, 9)
    good, short = tmp_path / "good.json", tmp_path / "short.json"
    good.write_text(json.dumps({"path": path.tolist()}))
    short.write_text(json.dumps(path[:4].tolist()))
    np.testing.assert_allclose(_plan(_exp("first_blocks"), "--camera_path", str(good)).camera, path[[0, 4, 8]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"--camera_path: camera path must have one .* row per frame: shape \(9, 4\)"):
        _plan(_exp("first_blocks"), "--camera_path", str(short))


@pytest.mark.parametrize("camera, flags, match", [
    (None, ["--camera", "pan_left:0.5"], "--camera: the DiT of /nowhere has no camera adapter"),
    ("all_blocks", ["--camera", "dolly_in:0.5"], "--camera: unknown camera move 'dolly_in'"),
    ("all_blocks", ["--camera", "zoom_in:nan"], "--camera: camera move zoom_in: value must be a finite number"),
    ("all_blocks", ["--camera", "pan_left:1", "--camera_path", "p.json"], "not both"),
    ("all_blocks", ["--camera_path", "/missing.json"], "--camera_path: .*No such file"),
])
def test_bad_camera_flags_are_named(camera, flags, match):
    with pytest.raises(ValueError, match=match):
        _plan(_exp(camera), *flags)
