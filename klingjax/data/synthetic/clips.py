"""Clip generation: combo sampling, motion and camera pan, compositing, metadata.

Every clip is a pure function of `(spec, seed, index[, split])`; the random draws happen in a fixed
order (combos, sizes, speeds, camera, texture, object starts, caption template), so changing that
order changes every clip of every dataset already written from a seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from klingjax.data.synthetic.background import texture
from klingjax.data.synthetic.captions import caption
from klingjax.data.synthetic.combos import heldout_combos, split_combos
from klingjax.data.synthetic.spec import DIRECTION_VECTORS, MARGIN, SPLITS, Clip, Combo, SyntheticSpec
from klingjax.data.synthetic.sprites import rasterize, sprite_height

_PAN_TO_SPEED = 0.4  # pan speed <= this x slowest object speed


def _sample_combos(spec: SyntheticSpec, rng: np.random.Generator, split: str | None) -> list[Combo]:
    combos = split_combos(spec, split) if split else split_combos(spec, "train") + split_combos(spec, "eval")
    if not combos:
        raise ValueError(f"split {split!r} has no combos (heldout_fraction={spec.heldout_fraction})")
    first = combos[rng.integers(len(combos))]
    if rng.random() >= spec.p_two_objects:
        return [first]
    # The second object shares the background and never the colour (so the two stay separable).
    others = [c for c in combos if c[3] == first[3] and c[0] != first[0]]
    return [first, others[rng.integers(len(others))]] if others else [first]


def generate_clip(spec: SyntheticSpec, seed: int, index: int, split: str | None = None) -> Clip:
    """Clip number `index` of stream `seed` (restricted to `split`'s combos when given); deterministic."""
    key = [seed, index] if split is None else [seed, index, SPLITS[split]]
    rng = np.random.default_rng(key)
    t_len, height, width = spec.num_frames, spec.height, spec.width
    combos = _sample_combos(spec, rng, split)
    sizes = rng.uniform(*spec.size_range, len(combos))
    speeds = rng.uniform(*spec.speed_range, len(combos))

    camera, cam_velocity = "static", np.zeros(2)
    if rng.random() < spec.p_camera_pan:
        pan_dir = spec.directions[rng.integers(len(spec.directions))]
        camera = f"pan_{pan_dir}"
        pan_speed = min(rng.uniform(*spec.pan_speed_range), _PAN_TO_SPEED * speeds.min())
        cam_velocity = pan_speed * np.asarray(DIRECTION_VECTORS[pan_dir], np.float64)

    # On-screen velocity = object velocity in the scene minus camera velocity; shrink every speed by
    # one common factor if some sprite could not stay fully inside the frame for the whole clip.
    obj_velocity = np.stack([s * np.asarray(DIRECTION_VECTORS[c[2]], np.float64) for s, c in zip(speeds, combos)])
    img_velocity = obj_velocity - cam_velocity  # (n, 2)
    extents = np.stack([[sprite_height(c[1], s), s] for s, c in zip(sizes, combos)])  # (n, 2) (h, w)
    room = np.array([height, width]) - 2 * MARGIN - extents  # (n, 2)
    travel = np.abs(img_velocity) * max(t_len - 1, 1)
    factor = min(1.0, float(np.min(room / np.maximum(travel, 1e-9))))
    speeds, cam_velocity, img_velocity = speeds * factor, cam_velocity * factor, img_velocity * factor
    travel = travel * factor

    t = np.arange(t_len, dtype=np.float64)
    cam_offsets = t[:, None] * cam_velocity[None]  # (T, 2) camera position in the scene
    bg_name = combos[0][3]
    frames = np.broadcast_to(spec.background_table[bg_name], (t_len, height, width, 3)).copy()
    frames += texture(rng, cam_offsets, height, width)[..., None]
    objects = []
    for combo, size, speed, vel, trav, rm in zip(combos, sizes, speeds, img_velocity, travel, room):
        colour, shape, direction, _ = combo
        # Start so that start + v * t stays in [margin, margin + room] for all t.
        lo = MARGIN + np.where(vel < 0, trav, 0.0)
        hi = MARGIN + rm - np.where(vel > 0, trav, 0.0)
        start = lo + rng.random(2) * np.maximum(hi - lo, 0.0)  # (2,) (y, x)
        top_left = (start[None] + t[:, None] * vel[None]).astype(np.float32)  # (T, 2)
        alpha = rasterize(shape, size, top_left, height, width)[..., None]  # (T, H, W, 1)
        frames += alpha * (spec.colour_table[colour] - frames)
        objects.append({
            "colour": colour, "shape": shape, "direction": direction, "speed": float(speed),
            "size": float(size), "start": [float(start[0]), float(start[1])],
            "screen_velocity": [float(vel[0]), float(vel[1])],  # px / frame (y, x), camera included
        })
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    meta = {
        "objects": objects, "num_objects": len(objects), "background": bg_name, "camera": camera,
        "camera_speed": float(np.abs(cam_velocity).sum()), "seed": int(seed), "index": int(index),
        "split": split or ("eval" if tuple(combos[0]) in heldout_combos(spec) else "train"),
    }
    return Clip(frames=frames, caption=caption(rng, combos, camera), meta=meta)


def generate_split(spec: SyntheticSpec, seed: int, split: str, n: int, start: int = 0) -> Iterator[Clip]:
    """Clips `start .. start + n - 1` of `split` ("train" | "eval"); every object's combo is in the split."""
    for index in range(start, start + n):
        yield generate_clip(spec, seed, index, split=split)
