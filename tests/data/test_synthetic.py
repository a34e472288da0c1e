"""Tests for klingjax.data.synthetic: determinism, captions, held-out split, sprites in frame, speed."""

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest

from klingjax.data.synthetic import (
    SyntheticSpec,
    generate_clip,
    generate_split,
    heldout_combos,
    rasterize,
    split_combos,
    sprite_height,
)

SPEC = SyntheticSpec(p_two_objects=0.3, p_camera_pan=0.3)


def _combos(clip):
    return {(o["colour"], o["shape"], o["direction"], clip.meta["background"]) for o in clip.meta["objects"]}


def test_same_seed_same_bytes_different_seed_differs():
    a, b = generate_clip(SPEC, 3, 11), generate_clip(SPEC, 3, 11)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (17, 32, 32, 3)
    assert a.frames.tobytes() == b.frames.tobytes() and a.caption == b.caption and a.meta == b.meta
    assert generate_clip(SPEC, 4, 11).frames.tobytes() != a.frames.tobytes()
    assert generate_clip(SPEC, 3, 12).frames.tobytes() != a.frames.tobytes()


def test_caption_contains_meta_words():
    for clip in generate_split(SPEC, 0, "train", 60):
        words = clip.caption.replace(",", "").split()
        for obj in clip.meta["objects"]:
            assert {obj["colour"], obj["shape"], obj["direction"]} <= set(words), clip.caption
        assert clip.meta["background"] in words
        if clip.meta["camera"] == "static":
            assert "camera" not in words
        else:
            assert clip.caption.endswith("the camera pans " + clip.meta["camera"].removeprefix("pan_"))
        assert clip.meta["num_objects"] == len(clip.meta["objects"])


def test_heldout_combos_never_in_train_and_vocab_still_covered():
    held = heldout_combos(SPEC)
    total = len(SPEC.colours) * len(SPEC.shapes) * len(SPEC.directions) * len(SPEC.backgrounds)
    assert abs(len(held) - SPEC.heldout_fraction * total) <= 1
    train = split_combos(SPEC, "train")
    assert not held & set(train) and len(train) + len(held) == total
    for i, vocab in enumerate(([c for c, _ in SPEC.colours], SPEC.shapes, SPEC.directions)):
        assert {c[i] for c in train} == set(vocab)
    assert heldout_combos(dataclasses.replace(SPEC)) == held  # stable, not seed dependent
    for clip in generate_split(SPEC, 1, "train", 150):
        assert not _combos(clip) & held
    for clip in generate_split(SPEC, 1, "eval", 30):
        assert _combos(clip) <= held and clip.meta["split"] == "eval"


def test_sprites_stay_inside_frame():
    spec = dataclasses.replace(SPEC, num_frames=33, p_camera_pan=0.5, p_two_objects=0.5)
    for i in range(80):
        clip = generate_clip(spec, 2, i)
        for obj in clip.meta["objects"]:
            start, vel = np.asarray(obj["start"]), np.asarray(obj["screen_velocity"])
            ext = np.array([sprite_height(obj["shape"], obj["size"]), obj["size"]])
            for t in (0, spec.num_frames - 1):
                top_left = start + t * vel
                assert np.all(top_left >= 0.999) and np.all(top_left + ext <= np.array([32, 32]) - 0.999), obj
        # Pans are slower than every object, so on-screen motion keeps the sign of the caption's direction.
        assert clip.meta["camera_speed"] <= 0.4 * min(o["speed"] for o in clip.meta["objects"]) + 1e-9


def test_rasterize_areas_match_geometry():
    top_left = np.array([[8.3, 9.7]], np.float32)
    expected = {"circle": np.pi / 4 * 100, "square": 100.0, "triangle": np.sqrt(3) / 4 * 100}
    for shape, area in expected.items():
        alpha = rasterize(shape, 10.0, top_left, 32, 32)
        assert alpha.shape == (1, 32, 32) and alpha.min() >= 0 and alpha.max() <= 1
        assert alpha.sum() == pytest.approx(area, rel=0.03), shape


def test_generator_speed():
    spec = SyntheticSpec()
    start = time.process_time()  # CPU time: robust to other processes sharing the cores
    for i in range(100):
        generate_clip(spec, 0, i)
    rate = 100 / (time.process_time() - start)
    assert rate >= 200, f"{rate:.0f} clips/s"


# sha256 over frames bytes, caption and metadata of the clips in `_golden_digest`, recorded from the original
# single-module generator. It changes whenever the random draws (or their order) change: that breaks every dataset
# already written from a seed, so only update it deliberately.
GOLDEN_DIGEST = "9a47bf86578ff2d6b34c31b66177910cb2d417318aad12ff3b06a00282850425"


def _golden_digest() -> str:
    spec = SyntheticSpec(num_frames=9, size_range=(5.0, 8.5), speed_range=(0.4, 1.6), p_two_objects=0.5,
                         p_camera_pan=0.6, heldout_fraction=0.2)
    clips = [generate_clip(spec, 5, i, split) for split in (None, "train", "eval") for i in range(8)]
    clips += [generate_clip(SyntheticSpec(), 0, i) for i in range(4)] + list(generate_split(SPEC, 1, "eval", 4))
    h = hashlib.sha256()
    for clip in clips:
        h.update(clip.frames.tobytes())
        h.update(clip.caption.encode())
        h.update(json.dumps(clip.meta, sort_keys=True).encode())
    return h.hexdigest()


def test_clips_bit_identical_to_golden():
    assert _golden_digest() == GOLDEN_DIGEST


def test_spec_dict_round_trip():
    assert SyntheticSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    with pytest.raises(ValueError):
        SyntheticSpec(shapes=("hexagon",))
    with pytest.raises(ValueError):
        next(generate_split(SyntheticSpec(heldout_fraction=0.0), 0, "eval", 1))
