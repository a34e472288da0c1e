"""Tests for klingjax.data.sampling and the frame-selective decoding in klingjax.data.video_io / pipeline."""


import clip_fixtures as cf
import numpy as np
import pytest

from klingjax.data.pipeline import VideoDecoder, decode_video_record
from klingjax.data.records import make_video_record
from klingjax.data.sampling import (
    cover_crop,
    drop_caption,
    example_rng,
    max_frames_at_fps,
    resize_crop,
    temporal_indices,
)
from klingjax.data.video_io import decode_frames, decode_video, encode_mp4, probe_video


def indexed_frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """uint8 (n, h, w, 3) frames whose colour encodes the frame number in 16 coarse levels (survives h264)."""
    i = np.arange(n)
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = ((i % 16) * 16 + 8)[:, None, None]
    frames[..., 1] = ((i // 16) * 16 + 8)[:, None, None]
    return frames


def frame_numbers(video: np.ndarray) -> list[int]:
    """Inverse of `indexed_frames` for uint8 frames or float frames in [-1, 1], read at the centre pixel."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (video + 1.0) * 127.5
    r, g = video[:, video.shape[1] // 2, video.shape[2] // 2, :2].astype(np.float64).T
    return (np.round((g - 8) / 16) * 16 + np.round((r - 8) / 16)).astype(int).tolist()


def test_temporal_indices_at_target_fps():
    # 30 -> 10 fps: stride 3; the centred window of 8 frames spans 22 source frames: starts 0..98, centre 49.
    assert temporal_indices(120, 8, source_fps=30, target_fps=10).tolist() == list(range(49, 71, 3))
    # 25 -> 10 fps: stride 2.5, nearest frame (halves round up).
    assert temporal_indices(11, 5, source_fps=25, target_fps=10).tolist() == [0, 3, 5, 8, 10]
    # 10 -> 20 fps: source frames repeat (4 frames give 7 at twice the rate).
    assert temporal_indices(4, 7, source_fps=10, target_fps=20).tolist() == [0, 1, 1, 2, 2, 3, 3]
    # No target rate: consecutive frames, centred at (F - n) // 2 as before.
    assert temporal_indices(10, 5).tolist() == [2, 3, 4, 5, 6]
    starts = set()
    for s in range(1000):
        idx = temporal_indices(120, 8, source_fps=30, target_fps=10, rng=np.random.default_rng(s))
        assert np.all(np.diff(idx) == 3) and 0 <= idx[0] and idx[-1] <= 119
        starts.add(int(idx[0]))
    assert min(starts) == 0 and max(starts) == 98 and len(starts) > 80  # uniform over every window that fits
    again = temporal_indices(120, 8, source_fps=30, target_fps=10, rng=np.random.default_rng(7))
    assert np.array_equal(again, temporal_indices(120, 8, source_fps=30, target_fps=10, rng=np.random.default_rng(7)))


def test_too_short_and_bad_rates_raise():
    with pytest.raises(ValueError, match="too short: 20 frames give 7 at 10 fps"):
        temporal_indices(20, 8, source_fps=30, target_fps=10)
    with pytest.raises(ValueError, match="frame rate"):
        temporal_indices(20, 4, source_fps=0, target_fps=10)
    with pytest.raises(ValueError, match="target_fps"):
        temporal_indices(20, 4, source_fps=30, target_fps=-1)
    rng = np.random.default_rng(0)
    for _ in range(200):  # max_frames_at_fps is exactly the longest window temporal_indices accepts
        n, src, tgt = int(rng.integers(1, 200)), float(rng.choice([24, 25, 29.97, 30, 60])), float(rng.uniform(4, 40))
        m = max_frames_at_fps(n, src, tgt)
        assert temporal_indices(n, m, source_fps=src, target_fps=tgt, rng=rng)[-1] <= n - 1
        with pytest.raises(ValueError):
            temporal_indices(n, m + 1, source_fps=src, target_fps=tgt)


def test_cover_crop_and_resize_crop():
    assert cover_crop(100, 200, 50, 50) == (50, 100, 0, 25)  # scale 0.5, then the centred 50x50 square
    offsets = [cover_crop(100, 200, 50, 50, np.random.default_rng(s)) for s in range(400)]
    lefts = {o[3] for o in offsets}
    assert all(o[:3] == (50, 100, 0) for o in offsets) and min(lefts) == 0 and max(lefts) == 50 and len(lefts) > 40
    frame = np.zeros((1, 20, 40, 3), np.uint8)
    frame[:, :, :20] = 255  # left half white
    centre = resize_crop(frame, 10, 10)[0, 5, :, 0]
    assert centre[0] > 220 and centre[-1] < 30  # the centred square straddles the edge
    crops = [resize_crop(frame, 10, 10, np.random.default_rng(s))[0, 5, 5, 0] for s in range(30)]
    assert min(crops) < 30 and max(crops) > 225  # random crops land on either half
    assert resize_crop(frame, 20, 40) is frame


def test_mp4_and_raw_paths_crop_the_same_window():
    """mp4 frames are scaled while converting to RGB, raw ones with PIL: same window, near-equal pixels."""
    y, x = np.mgrid[0:48, 0:80]
    image = np.stack([x * 3, y * 5, (x + y) * 2], -1).astype(np.uint8)  # smooth, asymmetric
    frames = np.repeat(image[None], 3, 0)  # (3, 48, 80, 3)
    raw = make_video_record(frames, codec="raw", caption="c", fps=8, num_frames=3, height=48, width=80)
    mp4 = dict(raw, codec="mp4", video=encode_mp4(frames, 8, crf=0))
    for seed in range(4):
        a, b = (decode_video_record(r, num_frames=3, height=32, width=32, rng=np.random.default_rng(seed),
                                    random_crop=True)["video"] for r in (raw, mp4))
        assert a.shape == b.shape == (3, 32, 32, 3) and np.abs(a - b).mean() < 0.03


def test_decode_video_record_picks_frames_at_target_fps():
    frames = indexed_frames(60)
    raw = make_video_record(frames, codec="raw", caption="c", fps=30, num_frames=60, height=16, width=16)
    mp4 = make_video_record(encode_mp4(frames, 30), codec="mp4", caption="c", fps=30, num_frames=60, height=16,
                            width=16)
    for record in (raw, mp4):
        out = decode_video_record(record, num_frames=5, height=8, width=8, target_fps=7.5)  # stride 4, starts 0..43
        assert out["video"].shape == (5, 8, 8, 3) and frame_numbers(out["video"]) == [21, 25, 29, 33, 37]
        for seed in range(3):  # a random window: the same indices temporal_indices draws from the same rng
            got = decode_video_record(record, num_frames=5, height=16, width=16, target_fps=7.5,
                                      rng=np.random.default_rng(seed), random_start=True)
            want = temporal_indices(60, 5, source_fps=30, target_fps=7.5, rng=np.random.default_rng(seed))
            assert frame_numbers(got["video"]) == want.tolist()
    u8 = decode_video_record(raw, num_frames=5, height=16, width=16, target_fps=7.5, dtype=np.uint8)["video"]
    assert u8.dtype == np.uint8 and np.array_equal(u8, frames[[21, 25, 29, 33, 37]])  # pixels as stored
    with pytest.raises(ValueError, match="need an rng"):
        decode_video_record(raw, num_frames=5, height=8, width=8, random_crop=True)
    with pytest.raises(ValueError, match="too short"):
        decode_video_record(mp4, num_frames=16, height=8, width=8, target_fps=7.5)
    decoder = VideoDecoder(5, 8, 8, target_fps=7.5, random_start=True)
    a, b = (decoder.random_map(raw, example_rng(0, 0, i, 0)) for i in (3, 3))
    assert np.array_equal(a["video"], b["video"])  # one example, one rng: one clip


def test_decode_frames_stops_early_and_seeks(tmp_path):
    frames = indexed_frames(200)
    data = encode_mp4(frames, 30)
    assert probe_video(data).num_frames == 200 and probe_video(data).fps == 30
    full = decode_video(data)
    for idx in ([0, 2, 4], [5, 5, 6], [150, 151, 199], list(range(40, 200, 9))):
        seeked, sequential = decode_frames(data, idx), decode_frames(data, idx, seek=False)
        assert np.array_equal(seeked, full[idx]) and np.array_equal(sequential, full[idx])
        assert frame_numbers(seeked) == idx
    # Noise frames make the frame data large, so cutting the file in half cuts the frames, not the index.
    noisy = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    cut = cf.faststart_mp4(noisy, 10, tmp_path)
    cut = cut[: len(cut) // 2]
    assert probe_video(cut).num_frames == 40  # the header is intact
    assert decode_frames(cut, [0, 3, 6]).shape == (3, 32, 32, 3)  # early frames decode: decoding stopped at 6
    with pytest.raises(ValueError, match="video ends before frame 39"):
        decode_frames(cut, [0, 39])
    bad_inputs = ((b"", "empty"), (b"not a video" * 9, "not a readable video"), (data[: len(data) // 2], "video"))
    for bad, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            decode_frames(bad, [0])
    with pytest.raises(ValueError, match="non-decreasing"):
        decode_frames(data, [3, 2])


def test_drop_caption_rate_and_determinism():
    drops = [drop_caption("a cat", 0.3, example_rng(5, 0, i, 1)) == "" for i in range(2000)]
    assert 0.25 < np.mean(drops) < 0.35
    assert drops == [drop_caption("a cat", 0.3, example_rng(5, 0, i, 1)) == "" for i in range(2000)]
    assert drop_caption("a cat", 0.0, np.random.default_rng(0)) == "a cat"
    with pytest.raises(ValueError):
        drop_caption("a cat", 1.5, np.random.default_rng(0))
