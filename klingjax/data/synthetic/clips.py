"""Clip generation: combo sampling, motion and camera pan, compositing, metadata.

Every clip is a pure function of `(spec, seed, index[, split])`; the random draws happen in a fixed
order (combos, sizes, speeds, camera, texture, object starts, caption template), so changing that
order changes every clip of every dataset already written from a seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from klingjax.data.synthetic import camera as camera_lib
from klingjax.data.synthetic.background import texture, texture_at
from klingjax.data.synthetic.bounce import window_clip
from klingjax.data.synthetic.captions import caption
from klingjax.data.synthetic.combos import heldout_combos, sample_combos
from klingjax.data.synthetic.spec import DIRECTION_VECTORS, MARGIN, SPLITS, Clip, Combo, SyntheticSpec
from klingjax.data.synthetic.sprites import SHAPE_SDFS, rasterize, sprite_height

_PAN_TO_SPEED = 0.4  # pan speed <= this x slowest object speed


def generate_clip(spec: SyntheticSpec, seed: int, index: int, split: str | None = None) -> Clip:
    """Clip number `index` of stream `seed` (restricted to `split`'s combos when given); deterministic."""
    key = [seed, index] if split is None else [seed, index, SPLITS[split]]
    rng = np.random.default_rng(key)
    t_len, height, width = spec.num_frames, spec.height, spec.width
    combos = sample_combos(spec, rng, split)
    if spec.motion == "bounce":
        return window_clip(spec, rng, combos, seed, index, split)
    sizes = rng.uniform(*spec.size_range, len(combos))
    speeds = rng.uniform(*spec.speed_range, len(combos))

    if spec.p_camera_move > 0:  # its draws come after the shared ones: other datasets are unchanged
        return _moving_camera_clip(spec, rng, combos, sizes, speeds, seed, index, split)
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


def _draw_moves(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, float]:
    """The clip's camera moves {name: per-frame value}: none (static), one, or two of different kinds."""
    if rng.random() >= spec.p_camera_move:
        return {}
    names = list(spec.camera_moves or camera_lib.MOVES)
    first = names[rng.integers(len(names))]
    chosen = [first]
    if rng.random() < spec.p_two_moves:
        others = [n for n in names if camera_lib.move_kind(n) != camera_lib.move_kind(first)]
        if others:
            chosen.append(others[rng.integers(len(others))])
    ranges = {"pan": spec.move_pan_range, "zoom": spec.zoom_rate_range, "roll": spec.roll_rate_range}
    return {n: float(rng.uniform(*ranges[camera_lib.move_kind(n)])) for n in chosen}


def _moving_camera_clip(spec: SyntheticSpec, rng: np.random.Generator, combos: list[Combo], sizes: np.ndarray,
                        speeds: np.ndarray, seed: int, index: int, split: str | None) -> Clip:
    """A clip seen through a moving camera (pan / zoom / roll, camera.py's convention), rendered exactly: texture
    and sprites are evaluated at the scene coordinates of every pixel; each object moves in the scene."""
    t_len, height, width = spec.num_frames, spec.height, spec.width
    moves = _draw_moves(spec, rng)
    rate = camera_lib.rates(moves)
    path = camera_lib.path_from_rates(rate, t_len)  # (T, 4)
    qy, qx = camera_lib.scene_of_pixels(path, height, width)  # (T, H, W) each
    scale = np.exp(path[:, 2])[:, None, None]
    t = np.arange(t_len, dtype=np.float64)
    bg_name = combos[0][3]
    frames = np.broadcast_to(spec.background_table[bg_name], (t_len, height, width, 3)).copy()
    world = np.random.default_rng(list(bg_name.encode())) if spec.camera_world_texture else rng
    frames += texture_at(world, qy, qx, amplitude=spec.camera_texture_amplitude,
                         wavelengths=spec.camera_texture_wavelengths)[..., None]
    objects = []
    for combo, size, speed in zip(combos, sizes, speeds):
        colour, shape, direction, _ = combo
        h = sprite_height(shape, size)
        half = 0.5 * np.array([h, size])
        for _ in range(64):  # a start (scene = screen at frame 0) whose whole screen track stays in frame
            velocity = speed * np.asarray(DIRECTION_VECTORS[direction], np.float64)  # scene px / frame
            centre0 = MARGIN + half + rng.random(2) * (np.array([height, width]) - 2 * (MARGIN + half))
            cy, cx = centre0[0] + t * velocity[0], centre0[1] + t * velocity[1]
            sy, sx = camera_lib.screen_of_scene(path, cy, cx, height, width)
            ext = half[None] * np.exp(path[:, 2:3]) * np.sqrt(2.0)  # rotated bbox bound, (T, 2)
            inside = ((sy - ext[:, 0] >= MARGIN) & (sy + ext[:, 0] <= height - MARGIN) &
                      (sx - ext[:, 1] >= MARGIN) & (sx + ext[:, 1] <= width - MARGIN))
            if inside.all():
                break
            speed *= 0.85  # slower objects fit more easily
        # Signed distance in scene px, coverage in screen px (a zoomed-in sprite has sharper, larger edges).
        dy, dx = qy - cy[:, None, None], qx - cx[:, None, None]
        alpha = np.clip(0.5 - SHAPE_SDFS[shape](dy, dx, size, h) * scale, 0.0, 1.0).astype(np.float32)[..., None]
        frames += alpha * (spec.colour_table[colour] - frames)
        screen = np.stack([sy, sx], -1)  # (T, 2) bbox centre on screen
        fit = np.polyfit(t, screen, 1)[0] if t_len > 1 else np.zeros(2)
        objects.append({
            "colour": colour, "shape": shape, "direction": direction, "speed": float(speed), "size": float(size),
            "start": [float(centre0[0] - half[0]), float(centre0[1] - half[1])],
            "screen_velocity": [float(fit[0]), float(fit[1])],  # px / frame, least-squares over the clip
            "scene_velocity": [float(velocity[0]), float(velocity[1])],
            "screen_track": screen.round(4).tolist(),
        })
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    names = camera_lib.move_names(rate)
    meta = {
        "objects": objects, "num_objects": len(objects), "background": bg_name,
        "camera": "+".join(names) or "static", "camera_moves": moves, "camera_rate": rate.tolist(),
        "camera_path": path.round(6).tolist(), "camera_speed": float(np.abs(rate[:2]).sum()),
        "seed": int(seed), "index": int(index),
        "split": split or ("eval" if tuple(combos[0]) in heldout_combos(spec) else "train"),
    }
    words = [camera_lib.CAPTION_WORDS[n] for n in moves] if spec.camera_words else []
    return Clip(frames=frames, caption=caption(rng, combos, "static", camera_words=words), meta=meta)


def generate_split(spec: SyntheticSpec, seed: int, split: str, n: int, start: int = 0) -> Iterator[Clip]:
    """Clips `start .. start + n - 1` of `split` ("train" | "eval"); every object's combo is in the split."""
    for index in range(start, start + n):
        yield generate_clip(spec, seed, index, split=split)
