"""The masked-video task table: every generation task is a pattern of given (clean) latent positions.

Text-to-video gives nothing; image-to-video gives latent frame 0; first+last frame, extension (prefix / suffix),
keyframes, inpainting (given outside a box) and outpainting (given inside a box) give the rest (DESIGN.md section
4, wave2.md section 1; LTX-2's trainer and Open-Sora 2.0 train on such a mixture with per-task weights). The
pattern functions return a (t, h, w) bool mask, True = given; `TASKS` maps each task name to how it draws its
parameters, and `sample_task` picks a task per example by weight, deterministically from (seed, step, index).
Neighbours: models/conditions.py (`Conditions.given_mask` carries the mask), diffusion/masked.py (loss and sampler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Grid = tuple[int, int, int]  # (t, h, w)
Box = tuple[int, int, int, int]  # (top, bottom, left, right) rows / columns, bottom and right exclusive

RNG_TASK = 3  # the task stream of an example's generator (data/sampling.py uses 0-2 for its own streams)


# ---------------------------------------------------------------------------------------------------
# Patterns: (t, h, w) bool, True = given
# ---------------------------------------------------------------------------------------------------


def t2v(grid: Grid) -> np.ndarray:
    """Nothing given: text-to-video."""
    return np.zeros(grid, bool)


def keyframes(grid: Grid, frames: Sequence[int]) -> np.ndarray:
    """The whole of each latent frame in `frames` given (negative indices count from the end)."""
    mask = t2v(grid)
    mask[list(frames)] = True
    return mask


def i2v(grid: Grid) -> np.ndarray:
    """Latent frame 0 given: image-to-video."""
    return keyframes(grid, [0])


def flf2v(grid: Grid) -> np.ndarray:
    """The first and last latent frames given (one frame if t = 1)."""
    return keyframes(grid, [0, -1])


def prefix(grid: Grid, k: int) -> np.ndarray:
    """The first k latent frames given: extension forwards."""
    return keyframes(grid, range(min(k, grid[0])))


def suffix(grid: Grid, k: int) -> np.ndarray:
    """The last k latent frames given: extension backwards."""
    return keyframes(grid, range(grid[0] - min(k, grid[0]), grid[0]))


def box_inpaint(grid: Grid, box: Box) -> np.ndarray:
    """Every position outside `box` (in every frame) given: inpainting regenerates the box."""
    top, bottom, left, right = box
    mask = np.ones(grid, bool)
    mask[:, top:bottom, left:right] = False
    return mask


def outpaint(grid: Grid, box: Box) -> np.ndarray:
    """Only the positions inside `box` (in every frame) given: outpainting generates the border."""
    return ~box_inpaint(grid, box)


# ---------------------------------------------------------------------------------------------------
# The table: how each task draws its parameters
# ---------------------------------------------------------------------------------------------------


def _box(grid: Grid, rng: np.random.Generator, lo: float, hi: float) -> Box:
    """A random box whose sides are fractions in [lo, hi] of the frame's (at least 1, less than the side if > 1)."""
    out = []
    for side in grid[1:]:
        longest = max(1, min(side - 1, int(hi * side)))
        size = int(rng.integers(min(longest, max(1, int(lo * side))), longest + 1))
        start = int(rng.integers(0, side - size + 1))
        out += [start, start + size]
    return out[0], out[1], out[2], out[3]


def _some_frames(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """2 .. t-1 distinct latent frames given at random (at least one generated)."""
    n = int(rng.integers(2, grid[0]))
    return keyframes(grid, rng.choice(grid[0], n, replace=False))


# Where a task's given latents come from. A causal VAE's encoding of a whole clip gives exact latents for any
# prefix of latent frames (frame 0 is an image encoded alone), and for whole frames' regions (inpaint / outpaint,
# where the source clip exists as a whole at generation time). A last frame, a keyframe or a suffix is an image a
# user hands in on its own: its latents come from encoding that pixel frame alone ("frames"); taken from the
# whole-clip encoding instead, they would leak the frames before it.
SOURCE_CLIP, SOURCE_FRAMES = "clip", "frames"


@dataclasses.dataclass(frozen=True)
class Task:
    """How one task draws its mask on a (t, h, w) grid, the smallest grid where something is generated, and where
    its given latents come from (`SOURCE_CLIP` or `SOURCE_FRAMES`)."""

    draw: Callable[[Grid, np.random.Generator], np.ndarray]
    min_frames: int = 1
    min_side: int = 1  # of h and w
    source: str = SOURCE_CLIP


TASKS: dict[str, Task] = {
    "t2v": Task(lambda g, rng: t2v(g)),
    "i2v": Task(lambda g, rng: i2v(g), min_frames=2),
    "flf2v": Task(lambda g, rng: flf2v(g), min_frames=3, source=SOURCE_FRAMES),
    "prefix": Task(lambda g, rng: prefix(g, int(rng.integers(1, g[0]))), min_frames=2),
    "suffix": Task(lambda g, rng: suffix(g, int(rng.integers(1, g[0]))), min_frames=2, source=SOURCE_FRAMES),
    "keyframes": Task(_some_frames, min_frames=3, source=SOURCE_FRAMES),
    "inpaint": Task(lambda g, rng: box_inpaint(g, _box(g, rng, 0.25, 0.5)), min_side=2),
    "outpaint": Task(lambda g, rng: outpaint(g, _box(g, rng, 0.5, 0.75)), min_side=2),
}


def task_weights(weights: Mapping[str, float], grid: Grid) -> dict[str, float]:
    """The positive weights of the tasks that fit `grid` (token grid), by name; raises on unknown names or none left."""
    if unknown := sorted(set(weights) - set(TASKS)):
        raise ValueError(f"unknown task(s) {unknown}; the task table has {sorted(TASKS)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"task weights must be >= 0, got {dict(weights)}")
    fits = {name: float(w) for name, w in sorted(weights.items()) if w > 0
            and grid[0] >= TASKS[name].min_frames and min(grid[1:]) >= TASKS[name].min_side}
    if not fits:
        raise ValueError(f"no task of {dict(weights)} with a positive weight fits the token grid {grid}")
    return fits


def sample_task(seed: int, step: int, index: int, weights: Mapping[str, float], grid: Grid,
                patch: Grid = (1, 1, 1)) -> tuple[str, np.ndarray]:
    """(task name, (t, h, w) bool given mask) of example `index` at `step`, a pure function of its arguments.

    weights: task name -> weight, e.g. {"t2v": 1, "i2v": 2}; tasks that cannot generate anything on the grid
    (i2v on one frame) are left out and the rest renormalised. grid: the latent grid; masks are drawn on the token
    grid (grid / patch) and repeated over each patch, so a token is either wholly given or wholly generated.
    """
    return draw_task(np.random.default_rng([seed, step, index, RNG_TASK]), weights, grid, patch)


def draw_task(rng: np.random.Generator, weights: Mapping[str, float], grid: Grid,
              patch: Grid = (1, 1, 1)) -> tuple[str, np.ndarray]:
    """`sample_task` with the generator given (the data pipeline passes each example's own stream)."""
    if any(g % p for g, p in zip(grid, patch)):
        raise ValueError(f"latent grid {grid} is not divisible by the patch {patch}")
    tokens = tuple(g // p for g, p in zip(grid, patch))
    fits = task_weights(weights, tokens)
    names, w = list(fits), np.array(list(fits.values()))
    name = names[int(rng.choice(len(names), p=w / w.sum()))]
    mask = TASKS[name].draw(tokens, rng)  # (T, H, W) on the token grid
    for axis, p in enumerate(patch):
        mask = mask.repeat(p, axis=axis)  # -> (t, h, w)
    return name, mask


def sample_tasks(seed: int, step: int, indices: Sequence[int], weights: Mapping[str, float], grid: Grid,
                 patch: Grid = (1, 1, 1)) -> tuple[list[str], np.ndarray]:
    """`sample_task` for each example index of a batch: (names, (B, t, h, w) bool given masks)."""
    drawn = [sample_task(seed, step, i, weights, grid, patch) for i in indices]
    return [n for n, _ in drawn], np.stack([m for _, m in drawn])


def key_frame(j: int, temporal_factor: int = 4) -> int:
    """The pixel frame whose lone encoding stands for latent frame j: 0 for j = 0, else the last of its group."""
    return temporal_factor * j


def given_latents(task: str, clip_latents: np.ndarray, frame_latents: np.ndarray) -> np.ndarray:
    """A task's given latents (t, h, w, C): the whole-clip encoding or the per-key-frame lone encodings (`Task.source`).

    Works on batches too (any leading axes, the same task for all).
    """
    return frame_latents if TASKS[task].source == SOURCE_FRAMES else clip_latents
