"""Tests for klingjax.eval.drift: exact on the ground truth (streamed in any chunks), and each metric catches its
failure: a recoloured sprite, a shifted background, a frozen, turned or mid-frame-reversing sprite, a vanished one,
jumps at seams."""

import dataclasses
import json

import numpy as np
import pytest

from klingjax.data.synthetic import SyntheticSpec, sprite_height
from klingjax.data.synthetic.bounce import long_clip
from klingjax.data.synthetic.spec import MARGIN
from klingjax.eval.drift import ACCURACIES, CURVES, DriftMeter, plot_curves, summarise, write_report
from klingjax.measures import PSNR_CAP

SPEC = SyntheticSpec(num_frames=17, motion="bounce", size_range=(9.0, 13.0), speed_range=(1.2, 2.0))
FPS, WINDOW, CHUNK = 8, 16, 12
NUM_FRAMES = 30 * FPS  # 30 s: 15 windows of 2 s


def _run(clip, video: np.ndarray, chunks=CHUNK, window: int = WINDOW) -> dict:
    """Feed `video` to a meter in chunks (an int: that size; a list: those sizes), a seam before each but the first."""
    meter = DriftMeter(clip, window=window, fps=FPS)
    sizes = [chunks] * -(-len(video) // chunks) if isinstance(chunks, int) else list(chunks)
    start = 0
    for size in sizes:
        meter.update(video[start:start + size], seam=start > 0)
        start += size
        assert sum(len(f) for f in meter._buffer) < window  # bounded: never more than one window held
    assert start >= len(video)
    return meter.result()


@pytest.fixture(scope="module")
def clip():
    return long_clip(SPEC, 0, 1, NUM_FRAMES)


@pytest.fixture(scope="module")
def truth(clip):
    return clip.frames(0, NUM_FRAMES)


@pytest.fixture(scope="module")
def truth_result(clip, truth):
    return _run(clip, truth)


@pytest.mark.parametrize("index", [1, 2, 3])
def test_ground_truth_scores_100_in_every_window(index):
    clip = long_clip(SPEC, 0, index, NUM_FRAMES)
    assert len(clip.sprites) == 1 and clip.sprites[0].bounces(NUM_FRAMES)  # it does bounce, many times
    result = _run(clip, clip.frames(0, NUM_FRAMES))
    json.dumps(result, allow_nan=False)
    assert result["time_s"] == [2.0 * i for i in range(15)]
    for key in ACCURACIES:
        assert result[key] == [1] * 15, key
    assert result["bg_psnr"] == [PSNR_CAP] * 15
    assert result["flicker"] == [0.0] * 15
    assert min(result["sharpness"]) > 10.0
    assert abs(result["seam_ratio"] - 1.0) < 0.2
    assert (result["num_frames"], result["num_seams"], result["occluded"]) == (NUM_FRAMES, 19, [0] * 15)


def test_two_sprite_ground_truth_scores_100_where_not_occluded():
    spec = dataclasses.replace(SPEC, p_two_objects=1.0)
    clear = 0
    for index in range(3):
        clip = long_clip(spec, 0, index, NUM_FRAMES)
        assert len(clip.sprites) == 2
        result = _run(clip, clip.frames(0, NUM_FRAMES))
        for i, occluded in enumerate(result["occluded"]):
            if not occluded:
                clear += 1
                assert all(result[k][i] == 1 for k in ACCURACIES), (index, i, result)
    assert clear >= 20


def test_streaming_is_exact(clip, truth, truth_result):
    whole = _run(clip, truth, chunks=NUM_FRAMES)
    odd = _run(clip, truth, chunks=[5, 12, 1, 12, 7, 30, 16, 2, 155])
    for key in ("time_s", *CURVES, "occluded"):
        assert whole[key] == truth_result[key] == odd[key], key
    assert whole["num_seams"] == 0 and whole["seam_ratio"] == 1.0


def test_partial_last_window_is_scored(clip, truth):
    result = _run(clip, truth[:NUM_FRAMES - 6])  # 234 frames: 14 windows and one of 10 frames
    assert len(result["time_s"]) == 15 and result["all"] == [1] * 15
    assert len(_run(clip, truth[:16 * 14 + 1])["time_s"]) == 14  # a lone last frame is no window


def test_recoloured_sprite_loses_colour(clip):
    other = next(c for c, _ in SPEC.colours if c != clip.sprites[0].colour)
    recoloured = dataclasses.replace(clip, sprites=(dataclasses.replace(clip.sprites[0], colour=other),))
    result = _run(clip, recoloured.frames(0, NUM_FRAMES))
    assert result["colour"] == [0] * 15 and result["all"] == [0] * 15
    assert result["count"] == [1] * 15 and min(result["bg_psnr"]) == PSNR_CAP


def test_shifted_background_drops_bg_psnr(clip, truth, truth_result):
    shifted = truth.astype(np.int16)
    shifted[..., 1] += 40
    result = _run(clip, np.clip(shifted, 0, 255).astype(np.uint8))
    assert max(result["bg_psnr"]) < 30.0 < min(truth_result["bg_psnr"])


def test_frozen_sprite_fails_direction(clip, truth):
    result = _run(clip, np.repeat(truth[5:6], NUM_FRAMES, axis=0))
    assert result["direction"] == [0] * 15 and result["all"] == [0] * 15
    assert result["colour"] == result["shape"] == result["count"] == [1] * 15


def test_motion_along_the_other_axis_fails_direction(clip):
    sprite = clip.sprites[0]
    other = {0: "right", 1: "down"}[sprite.axis]  # the other axis: x for a sprite bouncing up and down, y otherwise
    extent = sprite_height(sprite.shape, sprite.size) if other == "down" else sprite.size
    turned = dataclasses.replace(sprite, direction=other, hi=MARGIN + SPEC.height - 2 * MARGIN - extent)
    result = _run(clip, dataclasses.replace(clip, sprites=(turned,)).frames(0, NUM_FRAMES))
    assert result["direction"] == [0] * 15 and result["colour"] == result["count"] == [1] * 15


def test_reversal_away_from_the_edges_fails_direction(clip):
    sprite = clip.sprites[0]
    t = np.arange(NUM_FRAMES - 12, dtype=np.float64)
    pos = sprite.top_left(t)[:, sprite.axis]
    # a: frames a .. a+6 move one way with no bounce and the sprite is >= 5 px from both ends of its track at a+6
    a = next(int(a) for a in t if not any(a <= b <= a + 6 for b, _ in sprite.bounces(NUM_FRAMES))
             and sprite.lo + 5 <= pos[int(a) + 6] <= sprite.hi - 5)
    window = 12
    forward = clip.frames(a, a + window)
    mirrored = np.concatenate([forward[:7], forward[5:0:-1]])  # a .. a+6, then back a+5 .. a+1
    assert _run(clip, forward, chunks=window, window=window)["direction"] == [1]
    assert _run(clip, mirrored, chunks=window, window=window)["direction"] == [0]


def test_vanished_sprite_fails_count(clip, truth):
    video = truth.copy()
    video[3 * WINDOW:5 * WINDOW] = clip.background_frame()  # windows 3 and 4: the sprite has left
    result = _run(clip, video)
    expected = [0 if i in (3, 4) else 1 for i in range(15)]
    assert result["count"] == result["colour"] == result["all"] == expected
    assert min(result["bg_psnr"]) == PSNR_CAP


@pytest.mark.parametrize("jump", ["brightness", "roll"])
def test_jumps_at_seams_raise_seam_ratio(clip, truth, jump):
    video = truth.astype(np.int16)
    for k, start in enumerate(range(0, NUM_FRAMES, CHUNK)):
        if k % 2:
            chunk = video[start:start + CHUNK]
            video[start:start + CHUNK] = chunk + 20 if jump == "brightness" else np.roll(chunk, 1, axis=2)
    result = _run(clip, np.clip(video, 0, 255).astype(np.uint8))
    assert result["seam_ratio"] > 1.5 and result["seam_flicker"] > result["inchunk_flicker"] + 1.0
    assert result["num_seams"] == 19


def _synthetic_results(num_clips: int = 60, num_windows: int = 60) -> list[dict]:
    """Clip c is right in windows i < num_windows - c: the mean accuracy falls linearly from 100% to 1/60."""
    out = []
    for c in range(num_clips):
        hit = [int(i < num_windows - c) for i in range(num_windows)]
        out.append({"time_s": [2.0 * i for i in range(num_windows)], "colour": [1] * num_windows, "shape": hit,
                    "count": hit, "direction": hit, "all": hit, "bg_psnr": [40.0 - 0.1 * i for i in range(num_windows)],
                    "sharpness": [50.0] * num_windows, "flicker": [1.0] * num_windows, "seam_ratio": 1.0 + c / 59,
                    "seam_flicker": 2.0, "inchunk_flicker": 1.0, "num_frames": 16 * num_windows, "fps": 8.0})
    return out


def test_summarise_slopes_and_first_last_windows():
    s = summarise(_synthetic_results())
    # all(i) = 100 (60 - i) / 60 at t = 2i s = i / 30 min: 100 - 50 t_min; bg_psnr = 40 - 3 t_min.
    assert s["slope_per_min"]["all"] == pytest.approx(-50.0)
    assert s["slope_per_min"]["colour"] == pytest.approx(0.0, abs=1e-9)
    assert s["slope_per_min"]["bg_psnr"] == pytest.approx(-3.0)
    assert s["duration_s"] == 120.0
    assert s["first"]["all"] == pytest.approx(100.0 - 5.0 / 3.0 * 2.0)  # windows 0-4 (t < 10 s)
    assert s["last"]["all"] == pytest.approx(100.0 - 5.0 / 3.0 * 44.5)  # windows 30-59 (t >= 60 s)
    assert s["first"]["colour"] == s["last"]["colour"] == 100.0
    assert s["curves"]["all"][0] == 100.0 and s["curves"]["time_s"][-1] == 118.0
    assert s["seam_ratio"] == pytest.approx(1.5) and s["num_clips"] == 60
    short = summarise(_synthetic_results(num_clips=2), first_s=4.0, last_s=10.0)
    assert short["first"]["all"] == 100.0 and short["last"]["all"] == 90.0  # t >= 110 s: 100, 100, 100, 100, 50


def test_plot_and_report_write_files(tmp_path, truth_result):
    summaries = {"teacher": summarise([truth_result]), "drifting": summarise(_synthetic_results(num_clips=3))}
    plot_curves(summaries, str(tmp_path / "drift.png"))
    write_report(summaries, str(tmp_path / "drift.md"))
    assert (tmp_path / "drift.png").stat().st_size > 1000
    table = (tmp_path / "drift.md").read_text().splitlines()
    assert table[0].startswith("| method | first 10 s all |") and "seam ratio" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| teacher", "| drifting"]
    assert table[2].split(" | ")[1] == "100.0"
