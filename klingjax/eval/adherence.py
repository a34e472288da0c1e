"""Prompt adherence on synthetic clips: detect colour / shape / direction / count / camera, score vs truth.

The detector is plain image analysis that knows only the generator's vocabularies (`SyntheticSpec`):
1. background = per-channel median of the border pixels (sprites never touch the border);
2. every pixel far from the background is explained as background + alpha * (palette colour -
   background); it is assigned the colour with the smallest residual, which also un-mixes the
   anti-aliased / blurred edge pixels (they lie on that line);
3. per colour, in-plane connected components (tiny specks dropped) give a soft alpha map per frame;
   a colour with enough mass in most frames (half the smallest sprite the spec draws) is an object (objects in
   one clip never share a colour);
4. shape = the sprite template (same rasteriser as the generator, same area and centroid, blurred by
   the excess of the measured second moments over the sharp sprite's) with the least squared error;
5. direction = dominant axis of the least-squares centroid velocity, corrected for the camera;
   camera = Lucas-Kanade global shift of the smoothed background texture (objects blanked out).
`track` returns steps 1-3's per-object centroids per frame; `meta_centroids` the true ones of a clip's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from klingjax.data.synthetic import DIRECTION_VECTORS, SyntheticSpec, rasterize, sprite_height
from klingjax.data.synthetic.sprites import CENTROID_Y, centroid_offset

_FG_DISTANCE = 40.0  # RGB distance from the background that marks a pixel as foreground
_MIN_COMPONENT = 3  # px; smaller foreground specks are noise
_MIN_OBJECT_AREA = 6.0  # px of alpha mass per frame (in most frames) for a colour to count as an object ...
_MIN_OBJECT_FRACTION = 0.5  # ... and at least this fraction of the smallest sprite the spec can draw: a VAE's colour
# fringe at a moving edge (cyan -> a blue rim, yellow -> a red one, 7-15 px next to a 35+ px sprite) is not an object
# Per shape, with bbox width `size`: area / size^2, centroid y / bbox height, per-axis variance / size^2.
_AREA_PER_SIZE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": np.sqrt(3) / 4}
_VAR_PER_SIZE2 = {"circle": 1 / 16, "square": 1 / 12, "triangle": 1 / 24}
_MIN_MOVE_PX = 0.5  # total object displacement below which it has no direction
_MIN_PAN_PX = 1.0  # total background shift over the clip below which the camera is static
_TEXTURE_SMOOTH = 1.5  # px, gaussian sigma applied before estimating the texture shift
_PAN_PAIR_GAP = 4  # frames between the two frames of each Lucas-Kanade pair
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # connect within a frame, never across time


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a (T, H, W) mask by `radius` px in-plane (square neighbourhood), never across frames."""
    return ndimage.maximum_filter(mask, size=(1, 2 * radius + 1, 2 * radius + 1))


def _nearest(table: dict[str, np.ndarray], rgb: np.ndarray) -> str:
    names = list(table)
    dists = [np.linalg.norm(table[n] - rgb) for n in names]
    return names[int(np.argmin(dists))]


def _assign_colours(diff: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Best palette index per pixel of diff = frame - background, (N, 3) -> (N,), by line-fit residual."""
    alpha = np.clip(diff @ palette.T / np.sum(palette * palette, -1), 0.0, 1.0)  # (N, K)
    residual = np.sum((diff[:, None, :] - alpha[..., None] * palette[None]) ** 2, -1)  # (N, K)
    return np.argmin(residual, axis=1)


def _template_error(shape: str, alpha: np.ndarray, centroid: np.ndarray) -> float:
    """Squared error between alpha maps (F, H, W) and blurred `shape` sprites of the same area and centroid."""
    area = np.maximum(alpha.sum((1, 2)), 1e-6)  # (F,)
    size = float(np.sqrt(np.median(area) / _AREA_PER_SIZE2[shape]))  # bbox width; constant within a clip
    h = sprite_height(shape, size)
    top_left = np.stack([centroid[:, 0] - CENTROID_Y[shape] * h, centroid[:, 1] - 0.5 * size], -1)  # (F, 2)
    ys = np.arange(alpha.shape[1]) + 0.5
    xs = np.arange(alpha.shape[2]) + 0.5
    var_y = (alpha.sum(2) * (ys[None] - centroid[:, :1]) ** 2).sum(1) / area  # (F,)
    var_x = (alpha.sum(1) * (xs[None] - centroid[:, 1:]) ** 2).sum(1) / area  # (F,)
    # Gaussian blur adds sigma^2 to both variances: what exceeds the sharp sprite's variance is blur.
    blur = float(np.sqrt(max(np.median(0.5 * (var_y + var_x)) - _VAR_PER_SIZE2[shape] * size**2, 0.0)))
    sprites = rasterize(shape, size, top_left.astype(np.float32), *alpha.shape[1:])  # (F, H, W)
    if blur > 0.05:
        sprites = ndimage.gaussian_filter(sprites, (0, blur, blur))
    return float(np.sum((sprites - alpha) ** 2))


def smallest_sprite_area(spec: SyntheticSpec) -> float:
    """Area in px of the smallest sprite `spec` draws (its smallest bbox width, its least-area shape)."""
    return min(_AREA_PER_SIZE2[s] for s in spec.shapes) * spec.size_range[0] ** 2


def _classify_shape(alpha: np.ndarray, centroid: np.ndarray, valid: np.ndarray, shapes: Sequence[str]) -> str:
    """Shape whose blurred template best explains the alpha maps (T, H, W) in up to 8 valid frames."""
    frames = np.flatnonzero(valid)
    frames = frames[np.linspace(0, len(frames) - 1, min(len(frames), 8)).astype(int)]
    errors = {s: _template_error(s, alpha[frames], centroid[frames]) for s in shapes}
    return min(errors, key=errors.get)


def _direction(velocity: np.ndarray) -> str:
    """Direction word of the dominant axis of a (dy, dx) velocity."""
    axis = int(np.argmax(np.abs(velocity)))
    unit = [0, 0]
    unit[axis] = 1 if velocity[axis] > 0 else -1
    return {tuple(v): k for k, v in DIRECTION_VECTORS.items()}[tuple(unit)]


def _texture_velocity(diff: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """On-screen velocity (dy, dx) px/frame of the background texture, by Lucas-Kanade over frame pairs."""
    t_len = diff.shape[0]
    gap = min(_PAN_PAIR_GAP, t_len - 1)
    if gap < 1:
        return np.zeros(2)
    near = _dilate(foreground, 2)  # (T, H, W)
    # Blank the objects, then smooth: keeps the texture (wavelengths >= 5 px), removes most pixel noise.
    lum = ndimage.gaussian_filter(np.where(near, 0.0, diff.mean(-1)), (0, _TEXTURE_SMOOTH, _TEXTURE_SMOOTH))
    clean = ~_dilate(near, 2)  # away from the blanked objects
    i0, i1 = lum[:-gap], lum[gap:]  # (P, H, W): pairs of frames `gap` apart
    weight = (clean[:-gap] & clean[gap:]).astype(np.float32)
    weight[:, :2, :] = weight[:, -2:, :] = 0.0
    weight[:, :, :2] = weight[:, :, -2:] = 0.0
    # Brightness constancy: I1 - I0 = -gap * grad(I) . u, solved by least squares over all pairs.
    gy, gx = np.gradient(0.5 * (i0 + i1), axis=(1, 2))
    gy, gx, it = gy * gap, gx * gap, i1 - i0
    a = np.array([[np.sum(weight * gy * gy), np.sum(weight * gy * gx)],
                  [np.sum(weight * gy * gx), np.sum(weight * gx * gx)]])
    b = -np.array([np.sum(weight * gy * it), np.sum(weight * gx * it)])
    if np.linalg.det(a) <= 1e-6 * max(np.trace(a) ** 2, 1e-12):
        return np.zeros(2)
    return np.linalg.solve(a, b)


def _extract(frames: np.ndarray, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Steps 1-3 on uint8 frames (T, H, W, 3): background RGB, diff (T, H, W, 3), foreground (T, H, W) and one dict
    per object: colour, alpha (T, H, W), area (T,), valid (T,) frames and centroid (T, 2) (y, x) in px."""
    f = np.asarray(frames, np.float32)
    t_len = f.shape[0]
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1).reshape(-1, 3)  # (T*2(H+W), 3)
    bg = np.median(border, axis=0)
    diff = f - bg  # (T, H, W, 3)
    names = [c for c, _ in spec.colours]
    palette = np.stack([spec.colour_table[c] - bg for c in names])  # (K, 3)
    foreground = np.sum(diff * diff, -1) > _FG_DISTANCE**2  # (T, H, W)
    best = np.full(foreground.shape, -1)
    best[foreground] = _assign_colours(diff[foreground], palette)  # (T, H, W), -1 on the background

    min_area = max(_MIN_OBJECT_AREA, _MIN_OBJECT_FRACTION * smallest_sprite_area(spec))
    objects = []
    for k, name in enumerate(names):
        core = foreground & (best == k)
        if core.sum() < _MIN_COMPONENT * t_len // 2:
            continue
        labels, n = ndimage.label(core, structure=_IN_PLANE)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        core = (sizes >= _MIN_COMPONENT)[labels] & (labels > 0)
        # Soft edges (anti-aliasing, blur) reach ~2 px out; keep them unless they belong to another colour.
        region = _dilate(core, 2)
        region &= (best == k) | ~foreground
        alpha = diff @ palette[k] / (palette[k] @ palette[k])  # (T, H, W), unclipped so noise averages out
        obj_alpha = np.where(region, alpha, 0.0)
        area = obj_alpha.sum((1, 2))  # (T,)
        if np.median(area) < min_area:
            continue
        ys = np.arange(f.shape[1], dtype=np.float32) + 0.5
        xs = np.arange(f.shape[2], dtype=np.float32) + 0.5
        cy = (obj_alpha.sum(2) * ys).sum(1) / np.maximum(area, 1e-6)  # (T,)
        cx = (obj_alpha.sum(1) * xs).sum(1) / np.maximum(area, 1e-6)  # (T,)
        objects.append({"colour": name, "alpha": obj_alpha, "area": area, "centroid": np.stack([cy, cx], -1),
                        "valid": area >= 0.5 * np.median(area)})  # invalid: the object is occluded / merged
    return bg, diff, foreground, objects


def detect(frames: np.ndarray, spec: SyntheticSpec) -> dict:
    """Predict colour, shape, direction, num_objects, camera and background from uint8 frames (T, H, W, 3)."""
    t_len = np.shape(frames)[0]
    bg, diff, foreground, found = _extract(frames, spec)
    objects = []
    for obj in found:
        valid, centroid = obj["valid"], obj["centroid"]
        shape = _classify_shape(obj["alpha"], centroid, valid, spec.shapes)
        t = np.arange(t_len, dtype=np.float64)[valid]
        if len(t) >= 2:
            vy, vx = np.polyfit(t, centroid[valid, 0], 1)[0], np.polyfit(t, centroid[valid, 1], 1)[0]
        else:
            vy = vx = 0.0
        objects.append({"colour": obj["colour"], "shape": shape, "area": float(np.median(obj["area"])),
                        "screen_velocity": [float(vy), float(vx)]})

    texture_velocity = _texture_velocity(diff, foreground)
    camera = "static"
    if np.abs(texture_velocity).max() * (t_len - 1) >= _MIN_PAN_PX:
        camera = "pan_" + _direction(-texture_velocity)  # the scene moves opposite to the camera
    for obj in objects:
        # Scene velocity = screen velocity + camera velocity (= -texture velocity) when a pan is detected.
        scene = np.asarray(obj["screen_velocity"]) - (texture_velocity if camera != "static" else 0.0)
        obj["direction"] = _direction(scene) if np.abs(scene).max() * (t_len - 1) >= _MIN_MOVE_PX else None
    objects.sort(key=lambda o: -o["area"])
    first = objects[0] if objects else {}
    return {
        "colour": first.get("colour"), "shape": first.get("shape"), "direction": first.get("direction"),
        "num_objects": len(objects), "camera": camera, "background": _nearest(spec.background_table, bg),
        "texture_velocity": [float(v) for v in texture_velocity], "objects": objects,
    }


def track(frames: np.ndarray, spec: SyntheticSpec) -> dict[str, np.ndarray]:
    """Per detected object (keyed by colour), its alpha-weighted centroid (T, 2) (y, x) in px per frame of uint8
    frames (T, H, W, 3); NaN in frames where it is occluded / merged. Pixel centres are at +0.5."""
    _, _, _, objects = _extract(frames, spec)
    return {o["colour"]: np.where(o["valid"][:, None], o["centroid"], np.nan) for o in objects}


def meta_centroids(obj: dict, num_frames: int) -> np.ndarray:
    """True centroid (num_frames, 2) (y, x) in px of a ground-truth object (`meta["objects"][i]`) per frame."""
    size = obj["size"]
    offset = centroid_offset(obj["shape"], size)
    t = np.arange(num_frames, dtype=np.float64)[:, None]
    return np.asarray(obj["start"]) + t * np.asarray(obj["screen_velocity"]) + offset  # (T, 2)


def score(videos: np.ndarray, metas: Sequence[dict], spec: SyntheticSpec) -> dict[str, float]:
    """Accuracies of `detect` on videos uint8 (N, T, H, W, 3) against ground-truth metas (objects matched by colour).

    A clip's colour / shape / direction is right when it is right for every ground-truth object;
    `all_acc` needs all three. Also reports count, camera and background accuracy and `n`.
    """
    if len(videos) != len(metas):
        raise ValueError(f"{len(videos)} videos but {len(metas)} metas")
    hits = {k: 0 for k in ("colour", "shape", "direction", "all", "count", "camera", "background")}
    for video, meta in zip(videos, metas):
        pred = detect(video, spec)
        by_colour = {o["colour"]: o for o in pred["objects"]}
        matched = [(o, by_colour.get(o["colour"])) for o in meta["objects"]]
        colour = all(p is not None for _, p in matched)
        shape = all(p is not None and p["shape"] == o["shape"] for o, p in matched)
        direction = all(p is not None and p["direction"] == o["direction"] for o, p in matched)
        hits["colour"] += colour
        hits["shape"] += shape
        hits["direction"] += direction
        hits["all"] += colour and shape and direction
        hits["count"] += pred["num_objects"] == meta["num_objects"]
        hits["camera"] += pred["camera"] == meta.get("camera", "static")
        hits["background"] += pred["background"] == meta.get("background")
    n = max(len(metas), 1)
    out = {f"{k}_acc": v / n for k, v in hits.items()}
    out.update({f"{k}_correct": float(v) for k, v in hits.items()}, n=float(len(metas)))
    return out
