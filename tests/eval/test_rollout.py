"""Rollouts (klingjax/eval/rollout.py) on the kling runlocal work dir of tests/eval/conftest.py: chunk arithmetic, one
chunk = one-shot generation, determinism, re-noised context, colour anchoring, and a streaming mp4 writer whose memory
does not grow with the clip's length."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from klingjax.data.video_io import Mp4Writer
from klingjax.eval import media, rollout

PROMPT = ["a red circle bounces left and right on a black background"]


def test_chunk_sizes_cover_the_length_exactly():
    assert rollout.chunk_sizes(24, 9, 9, 2, 4) == [4, 4, 4, 3]  # context 2 of 3 latent frames: 5 given, 4 new
    assert rollout.chunk_sizes(9, 9, 9, 1, 4) == []
    assert rollout.chunk_sizes(40, 17, 17, 2, 4) == [12, 11]
    with pytest.raises(ValueError, match="context 3 must be in 1..2"):
        rollout.chunk_sizes(24, 9, 9, 3, 4)


@pytest.mark.parametrize("kwargs, match", [(dict(anchor="sink"), "anchor must be one of"),
                                           (dict(decode="tiled"), "decode must be one of"),
                                           (dict(context_noise=1.0), "context_noise 1.0 must be in"),
                                           (dict(context=0), "context 0 must be >= 1")])
def test_bad_rollout_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rollout.RolloutConfig(**kwargs)


def test_one_chunk_is_one_shot_generation_and_rollouts_are_deterministic(workdir, loader):
    _, gen = loader(workdir)
    key = jax.random.key(3)
    chunks = list(rollout.rollout(gen, PROMPT, key, 9, quiet=True))
    assert len(chunks) == 1 and chunks[0][1] is False
    np.testing.assert_array_equal(chunks[0][0], gen(PROMPT, jax.random.fold_in(key, 0), batch_size=1))
    config = rollout.RolloutConfig(context=2, context_noise=0.1)
    runs = [np.concatenate([c for c, _ in rollout.rollout(gen, PROMPT, k, 20, config=config, quiet=True)], axis=1)
            for k in (key, key, jax.random.key(4))]
    assert runs[0].shape == (1, 20, 32, 32, 3)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_start_frames_come_first_and_every_later_chunk_is_a_seam(workdir, loader):
    _, gen = loader(workdir)
    start = np.random.default_rng(0).integers(0, 255, (1, 6, 32, 32, 3), dtype=np.uint8)
    chunks = list(rollout.rollout(gen, PROMPT, jax.random.key(0), 14, start=start, quiet=True))
    np.testing.assert_array_equal(chunks[0][0], start)
    assert [c.shape[1] for c, _ in chunks] == [6, 4, 4] and [s for _, s in chunks] == [False, True, True]


def test_context_noise_changes_the_sample_and_needs_given_latents(workdir, loader):
    _, gen = loader(workdir)
    given = np.zeros((1, *gen.latent_shape), np.float32)
    mask = np.zeros((1, *gen.latent_shape[:3]), bool)
    mask[:, 0] = True
    key = jax.random.key(1)
    clean = gen(PROMPT, key, batch_size=1, given=given, given_mask=mask)
    noisy = gen(PROMPT, key, batch_size=1, given=given, given_mask=mask, context_noise=0.2)
    assert np.abs(clean.astype(int) - noisy).max() > 0
    with pytest.raises(ValueError, match="context_noise re-noises given latents"):
        gen(PROMPT, key, batch_size=1, context_noise=0.2)


def test_colour_anchor_moves_each_clip_to_the_anchor_statistics():
    rng = np.random.default_rng(0)
    frames = rng.integers(60, 140, (2, 5, 8, 8, 3)).astype(np.uint8)
    mean, std = np.array([[100.0, 50, 30], [20, 200, 90]]), np.array([[10.0, 5, 20], [8, 12, 6]])
    m, s = rollout.colour_stats(rollout.match_colour(frames, mean, std))
    np.testing.assert_allclose(m, mean, atol=0.6)
    np.testing.assert_allclose(s, std, atol=0.6)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_the_mp4_stream_keeps_memory_flat_and_appears_only_when_complete(tmp_path):
    """1200 frames of 128x128 (56 MiB raw) stream through in chunks of 12 with RSS growing < 16 MiB; the file shows
    up only at the end, with every frame."""
    rng = np.random.default_rng(0)
    chunk = np.repeat(rng.integers(0, 255, (1, 128, 128, 3), dtype=np.uint8), 12, axis=0)
    path = tmp_path / "long.mp4"
    with media.mp4_stream(path, 8.0) as write:
        write(chunk)  # warm up the encoder's buffers
        before = _rss_mib()
        for i in range(99):
            write(np.roll(chunk, i, axis=2))
        grown = _rss_mib() - before
        assert not path.exists()
    assert grown < 16.0, grown
    assert len(media.read_video(path)) == 1200


def test_a_failed_stream_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="frames of 8x8 after frames of 16x16"):
        with media.mp4_stream(tmp_path / "x.mp4", 8.0) as write:
            write(np.zeros((2, 16, 16, 3), np.uint8))
            write(np.zeros((2, 8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_chunks_equal_one_write(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    with Mp4Writer(str(tmp_path / "a.mp4"), 8.0) as w:
        w.write(frames)
    with Mp4Writer(str(tmp_path / "b.mp4"), 8.0) as w:
        for i in range(0, 10, 3):
            w.write(frames[i:i + 3])
    np.testing.assert_array_equal(media.read_video(tmp_path / "a.mp4"), media.read_video(tmp_path / "b.mp4"))


def test_drift_evaluation_streams_rollouts_into_meters_and_a_video(workdir, loader, tmp_path):
    from klingjax.data.synthetic import SyntheticSpec
    from klingjax.eval import long_video

    _, gen = loader(workdir)
    spec = SyntheticSpec(num_frames=9, motion="bounce", size_range=(9.0, 13.0), speed_range=(1.2, 2.0))
    truths = long_video.truth_clips(spec, 0, 2, 3.0)  # 24 frames: 5 given + 4 chunks of 4 + 3
    out = long_video.evaluate_method(gen, truths, rollout.RolloutConfig(context=2, anchor="colour"),
                                     key=jax.random.key(0), window_s=1.0, video_path=str(tmp_path / "r.mp4"))
    assert [r["num_frames"] for r in out["results"]] == [24, 24] and len(out["results"][0]["time_s"]) == 3
    assert out["results"][0]["num_seams"] == 5 and set(out["summary"]) >= {"first", "last", "slope_per_min"}
    assert len(media.read_video(tmp_path / "r.mp4")) == 24


def test_stream_decoding_continues_one_decoder_across_chunks(workdir, loader):
    """decode="stream": a rollout's frames are the decoder run once over [first chunk's latents, each chunk's new
    latents] (what gen.decode_streaming would make of them in one piece, up to the chunked cache's rounding)."""
    _, gen = loader(workdir)
    key = jax.random.key(5)
    config = rollout.RolloutConfig(context=2, decode="stream")
    frames = np.concatenate([c for c, _ in rollout.rollout(gen, PROMPT, key, 17, config=config, quiet=True)], axis=1)
    assert frames.shape == (1, 17, 32, 32, 3)
    z0 = gen(PROMPT, jax.random.fold_in(key, 0), batch_size=1, return_latents=True)  # (1, 3, h, w, C)
    np.testing.assert_array_equal(frames[:, :9], gen.decode_step(z0)[0])
    whole = gen.decode(z0, batch_size=1)
    assert np.abs(whole.astype(int) - frames[:, :9]).max() <= 2  # one-piece decode of the same latents
    # Chunk 1 continues the first chunk's decoder: its new latents decoded after z0's.
    tail = frames[:, 4:9]
    z = gen.encode(tail, batch_size=1)
    given = np.zeros((1, *gen.latent_shape), np.float32)
    given[:, :2] = z
    mask = np.zeros((1, *gen.latent_shape[:3]), bool)
    mask[:, :2] = True
    z1 = gen(PROMPT, jax.random.fold_in(key, 1), batch_size=1, given=given, given_mask=mask, return_latents=True)
    _, cache = gen.decode_step(z0)
    np.testing.assert_array_equal(frames[:, 9:13], gen.decode_step(z1[:, 2:], cache)[0])


def test_smooth_colour_anchor_ramps_from_the_previous_map_to_the_new_one():
    rng = np.random.default_rng(1)
    frames = rng.integers(60, 140, (1, 4, 6, 6, 3)).astype(np.uint8)
    previous = (np.full((1, 3), 1.0, np.float32), np.zeros((1, 3), np.float32))
    target = (np.full((1, 3), 0.5, np.float32), np.full((1, 3), 40.0, np.float32))
    out = rollout.ramp_colour(frames, previous, target).astype(np.float64)
    x = frames.astype(np.float64)
    np.testing.assert_allclose(out[:, -1], np.rint(0.5 * x[:, -1] + 40), atol=0.5)  # the last frame: the new map
    np.testing.assert_allclose(out[:, 0], np.rint(0.875 * x[:, 0] + 10), atol=0.5)  # 1/4 of the way
    mean, std = np.array([[90.0, 100, 110]]), np.array([[9.0, 10, 11]])
    scale, offset = rollout.colour_transfer(frames, mean, std)
    np.testing.assert_array_equal(rollout.apply_colour(frames, scale, offset), rollout.match_colour(frames, mean, std))
