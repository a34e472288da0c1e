"""The masked-video task table: each mask pattern, and per-example sampling (deterministic, by weight)."""

import collections

import numpy as np
import pytest

from klingjax.data import tasks

GRID = (5, 4, 6)  # latent (t, h, w)


def _frames(mask):
    """The latent frames that are wholly given."""
    return [i for i in range(mask.shape[0]) if mask[i].all()]


def test_frame_patterns():
    assert tasks.t2v(GRID).shape == GRID and not tasks.t2v(GRID).any()
    for mask, frames in [(tasks.i2v(GRID), [0]), (tasks.flf2v(GRID), [0, 4]), (tasks.prefix(GRID, 2), [0, 1]),
                         (tasks.suffix(GRID, 2), [3, 4]), (tasks.keyframes(GRID, [1, -1]), [1, 4])]:
        assert mask.dtype == bool and mask.shape == GRID
        assert _frames(mask) == frames and mask.sum() == len(frames) * 4 * 6  # whole frames, nothing else
    assert _frames(tasks.flf2v((1, 2, 2))) == [0]
    assert tasks.prefix(GRID, 9).all()  # k clipped to t


def test_box_patterns_are_complements():
    box = (1, 3, 2, 5)  # rows 1-2, columns 2-4
    inpaint, outpaint = tasks.box_inpaint(GRID, box), tasks.outpaint(GRID, box)
    np.testing.assert_array_equal(outpaint, ~inpaint)
    inside = np.zeros(GRID, bool)
    inside[:, 1:3, 2:5] = True
    np.testing.assert_array_equal(outpaint, inside)  # the same box in every frame
    assert inpaint.sum() == 5 * (24 - 6)


def test_sampling_is_a_pure_function_of_seed_step_index():
    weights = {"t2v": 1, "i2v": 1, "prefix": 1, "keyframes": 1, "inpaint": 1, "outpaint": 1}
    a = tasks.sample_tasks(0, 7, range(64), weights, GRID)
    b = tasks.sample_tasks(0, 7, range(64), dict(reversed(weights.items())), GRID)  # mapping order is irrelevant
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[1].shape == (64, *GRID)
    for other in (tasks.sample_tasks(1, 7, range(64), weights, GRID), tasks.sample_tasks(0, 8, range(64), weights,
                                                                                          GRID)):
        assert other[0] != a[0]
    name, mask = tasks.sample_task(0, 7, 5, weights, GRID)  # one example alone = its row in the batch
    assert name == a[0][5] and np.array_equal(mask, a[1][5])


def test_sampling_respects_weights_and_every_task_generates_something():
    weights = {name: 1.0 for name in tasks.TASKS} | {"i2v": 3.0, "flf2v": 0.0}
    names, masks = tasks.sample_tasks(3, 0, range(4000), weights, GRID)
    counts = collections.Counter(names)
    assert "flf2v" not in counts and set(counts) == set(weights) - {"flf2v"}
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(counts[name] / 4000 - w / total) < 0.025, (name, counts)
    flat = masks.reshape(4000, -1)
    assert not flat.all(axis=1).any()  # something is always generated
    given = flat.any(axis=1)
    assert all(given[i] == (n != "t2v") for i, n in enumerate(names))


def test_tasks_that_do_not_fit_the_grid_are_left_out():
    names, _ = tasks.sample_tasks(0, 0, range(50), {"t2v": 1, "i2v": 5, "prefix": 5}, (1, 4, 4))
    assert set(names) == {"t2v"}  # one latent frame: nothing to generate after a given frame
    with pytest.raises(ValueError, match="fits the token grid"):
        tasks.sample_task(0, 0, 0, {"flf2v": 1}, (2, 4, 4))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.sample_task(0, 0, 0, {"img2vid": 1}, GRID)
    with pytest.raises(ValueError, match=">= 0"):
        tasks.sample_task(0, 0, 0, {"t2v": -1}, GRID)


def test_masks_are_drawn_on_the_token_grid():
    patch = (1, 2, 2)
    for i in range(40):
        name, mask = tasks.sample_task(0, 0, i, {"inpaint": 1, "outpaint": 1}, (2, 8, 8), patch)
        blocks = mask.reshape(2, 4, 2, 4, 2)  # (t, H, ph, W, pw)
        assert (blocks.all(axis=(2, 4)) == blocks.any(axis=(2, 4))).all(), name  # each patch wholly one kind
    with pytest.raises(ValueError, match="not divisible by the patch"):
        tasks.sample_task(0, 0, 0, {"t2v": 1}, (2, 7, 8), patch)
