"""Media writers: mp4 round trip through PyAV, gif frame count, grid and PNG sizes."""

import numpy as np
import pytest
from PIL import Image

from klingjax.eval import media


def _clip(t=10, h=32, w=32):
    """Smooth moving gradient (T, H, W, 3) uint8: compresses well, so decoded content is comparable."""
    yy, xx = np.mgrid[:h, :w]
    frames = [np.stack([(xx * 6 + 8 * k) % 256, yy * 6 % 256, np.full_like(xx, 40 + 10 * k)], -1) for k in range(t)]
    return np.stack(frames).astype(np.uint8)


def test_upscale_nearest():
    x = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    up = media.upscale(x, 3)
    assert up.shape == (1, 6, 6, 3)
    np.testing.assert_array_equal(up[0, :3, :3], np.broadcast_to(x[0, 0, 0], (3, 3, 3)))
    with pytest.raises(ValueError):
        media.upscale(x, 0)


def test_mp4_round_trip_with_scale(tmp_path):
    clip = _clip()
    path = tmp_path / "clip.mp4"
    media.write_mp4(path, clip, fps=8, scale=4)
    decoded = media.read_video(path)
    assert decoded.shape == (10, 128, 128, 3)
    err = np.abs(decoded.astype(np.int32) - media.upscale(clip, 4).astype(np.int32)).mean()
    assert err < 6.0, err


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    clip = _clip(t=4, h=15, w=21)
    path = tmp_path / "odd.mp4"
    media.write_mp4(path, clip, fps=24)
    decoded = media.read_video(path)
    assert decoded.shape == (4, 16, 22, 3)
    assert np.abs(decoded[:, :15, :21].astype(np.int32) - clip.astype(np.int32)).mean() < 10.0


def test_mp4_rejects_float_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        media.write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)


def test_gif_frame_count_and_size(tmp_path):
    path = tmp_path / "clip.gif"
    media.write_gif(path, _clip(t=7), fps=10, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 7
        assert im.size == (64, 64)
        assert im.info["duration"] == 100
        assert im.info["loop"] == 0


def test_video_grid_layout():
    videos = np.stack([np.full((3, 4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = media.video_grid(videos, ncols=2, pad=1)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 6 + 1, 3)  # 3 rows of (4 + 1), 2 cols of (5 + 1), + border
    assert (grid[:, 1:5, 1:6] == 10).all() and (grid[:, 1:5, 7:12] == 20).all()
    assert (grid[:, 11:15, 7:12] == 255).all()  # empty sixth cell stays pad colour


def test_png_grid_size_and_frame_choice(tmp_path):
    videos = np.stack([np.stack([np.full((8, 8, 3), t, np.uint8) for t in range(9)])] * 3)  # frame t has value t
    path = tmp_path / "grid.png"
    img = media.write_png_grid(path, videos, ncols=2, frames_per_row=3, scale=2, pad=4)
    strip_w = 3 * 16 + 2 * 1  # 3 frames of 16 px with 1 px gaps
    with Image.open(path) as im:
        assert im.size == (2 * (strip_w + 4) + 4, 2 * (16 + 4) + 4)
    np.testing.assert_array_equal(img[4, 4 + np.array([0, 17, 34])], [[0] * 3, [4] * 3, [8] * 3])  # frames 0, 4, 8


def test_png_grid_captions_add_text_rows(tmp_path):
    videos = np.zeros((2, 9, 8, 8, 3), np.uint8)
    plain = media.write_png_grid(tmp_path / "a.png", videos, ncols=2, frames_per_row=4, scale=4)
    captioned = media.write_png_grid(
        tmp_path / "b.png", videos, ncols=2, frames_per_row=4, scale=4, captions=["a red ball", "x" * 500]
    )
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    assert (captioned[plain.shape[0] - 4 :] < 128).any()  # some dark caption pixels below the frames
    with pytest.raises(ValueError, match="captions"):
        media.write_png_grid(tmp_path / "c.png", videos, ncols=2, frames_per_row=4, captions=["one"])
