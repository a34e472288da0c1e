"""Camera control, measured exactly on synthetic clips: estimate each clip's camera from its pixels, score against
the renderer's camera (metadata `camera_rate`, convention in klingjax/data/synthetic/camera.py).

Estimator: the background texture's global similarity transform (translation, scale, rotation about the image
centre) between frames t and t + g, by Gauss-Newton Lucas-Kanade on the smoothed luminance with the sprites blanked
out (the adherence detector's foreground, dilated), over every pair g frames apart; each pair's transform gives the
camera's per-frame rates (pan velocity in px / frame at frame 0's scale, zoom as d log(scale) / frame, roll in
rad / frame) through the camera model, and the clip's estimate is their median. Moves are named from the rates with
per-clip thresholds (`move_names`).

Metrics (`score`): camera-move accuracy (the set of moves named equals the true set, static included), camera
direction accuracy (per true move of a moving clip: the estimate moves that way - the dominant pan axis and sign, the
sign of zoom / roll - whatever else it adds), mean pan
translation error |v - v_true| (px / frame), zoom-rate error |(exp z - 1) - (exp z_true - 1)| (% per frame), roll
error (degrees / frame), and object-direction accuracy under camera motion: each detected object's screen track is
mapped back into the scene through the *estimated* camera and its scene velocity's direction compared with the
truth, reported on moving-camera and on static-camera clips separately (disentanglement).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from klingjax.data.synthetic import SyntheticSpec
from klingjax.data.synthetic import camera as camera_lib
from klingjax.eval import adherence

_SMOOTH = 1.0  # px, gaussian sigma of the luminance before matching
_PAIR_GAP = 4  # frames between the two frames of a pair
_ITERS = 12
# A move is named when it adds up over the clip to at least this much (per-clip totals, not rates).
MIN_PAN_TOTAL = 1.0  # px
MIN_ZOOM_TOTAL = 0.04  # log scale (~4%)
MIN_ROLL_TOTAL = 0.06  # rad (~3.4 degrees)


def _pair_similarity(i0: np.ndarray, i1: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray | None:
    """(dy, dx, log_a, phi) with p1 = c + a R(phi)(p0 - c) + d mapping frame 0's pixels onto frame 1 (H, W) images;
    w0, w1: (H, W) weights (0 on sprites and borders). None if the texture does not constrain it."""
    h, w = i0.shape
    cy, cx = h / 2.0, w / 2.0
    yy, xx = np.meshgrid(np.arange(h) + 0.5 - cy, np.arange(w) + 0.5 - cx, indexing="ij")  # p0 - c
    gy1, gx1 = np.gradient(i1)
    theta = np.zeros(4)
    for _ in range(_ITERS):
        dy, dx, la, phi = theta
        a, cs, sn = np.exp(la), np.cos(phi), np.sin(phi)
        wy, wx = a * (sn * xx + cs * yy), a * (cs * xx - sn * yy)  # a R(phi)(p0 - c), (y, x)
        py, px = cy + wy + dy, cx + wx + dx  # frame-1 coordinates of frame 0's pixel centres
        coords = np.stack([py - 0.5, px - 0.5])
        warped = ndimage.map_coordinates(i1, coords, order=1, mode="nearest")
        gy = ndimage.map_coordinates(gy1, coords, order=1, mode="nearest")
        gx = ndimage.map_coordinates(gx1, coords, order=1, mode="nearest")
        inside = (py > 1.5) & (py < h - 1.5) & (px > 1.5) & (px < w - 1.5)
        weight = w0 * ndimage.map_coordinates(w1, coords, order=0, mode="constant") * inside
        # d p1 / d(dy, dx, log_a, phi) in (y, x): identity, (wy, wx), (wx, -wy)
        jac = np.stack([gy, gx, gy * wy + gx * wx, gy * wx - gx * wy], -1)  # (H, W, 4)
        r = warped - i0
        a_mat = np.einsum("hwi,hwj,hw->ij", jac, jac, weight)
        b_vec = -np.einsum("hwi,hw,hw->i", jac, r, weight)
        if not (np.isfinite(a_mat).all() and np.isfinite(b_vec).all()) or np.linalg.cond(a_mat) > 1e8:
            return None  # no texture left to match (e.g. a generated clip with a flat background)
        step = np.linalg.solve(a_mat, b_vec)
        theta = theta + step
        if np.abs(theta[:2]).max() > 0.5 * max(h, w) or abs(theta[2]) > 1.0 or abs(theta[3]) > 1.0:
            return None  # diverged: no similarity transform explains the pair
        if np.abs(step).max() < 1e-6:
            break
    return theta


def estimate_rates(frames: np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """Per-frame camera rates (vy, vx, dlog_scale, droll) of uint8 frames (T, H, W, 3) (camera.py's convention)."""
    t_len = frames.shape[0]
    gap = min(_PAIR_GAP, t_len - 1)
    if gap < 1:
        return np.zeros(camera_lib.CAMERA_DIMS)
    _, diff, foreground, _ = adherence._extract(frames, spec)
    near = ndimage.maximum_filter(foreground, size=(1, 7, 7))  # sprites + 3 px
    lum = ndimage.gaussian_filter(np.where(near, 0.0, diff.mean(-1)), (0, _SMOOTH, _SMOOTH))
    clean = ~ndimage.maximum_filter(near, size=(1, 5, 5))  # away from the blanked sprites
    weight = clean.astype(np.float64)
    weight[:, :2], weight[:, -2:], weight[:, :, :2], weight[:, :, -2:] = 0.0, 0.0, 0.0, 0.0
    estimates = []
    for t in range(t_len - gap):
        theta = _pair_similarity(lum[t], lum[t + gap], weight[t], weight[t + gap])
        if theta is None:
            continue
        dy, dx, la, phi = theta
        z, roll = la / gap, -phi / gap
        # d = -a R(phi) s_t R(-r_t) (g v)  =>  v = -R(r_t) R(-phi) d / (a s_t g), with s_t, r_t from the rates.
        s_t, r_t = np.exp(z * t), roll * t
        uy, ux = _rotate(-phi, dy, dx)
        vy, vx = _rotate(r_t, uy, ux)
        scale = -1.0 / (np.exp(la) * s_t * gap)
        estimates.append([vy * scale, vx * scale, z, roll])
    if not estimates:
        return np.zeros(camera_lib.CAMERA_DIMS)
    return np.median(np.asarray(estimates), axis=0)


def _rotate(angle: float, y: float, x: float) -> tuple[float, float]:
    """R(angle) on (x, y), returned as (y', x')."""
    c, s = np.cos(angle), np.sin(angle)
    return s * x + c * y, c * x - s * y


def move_names(rate: np.ndarray, num_frames: int) -> list[str]:
    """Camera moves named from rates, with per-clip thresholds (MIN_*_TOTAL over the clip's num_frames - 1 steps)."""
    n = max(num_frames - 1, 1)
    return camera_lib.move_names(rate, pan_eps=MIN_PAN_TOTAL / n, zoom_eps=MIN_ZOOM_TOTAL / n,
                                 roll_eps=MIN_ROLL_TOTAL / n)


def scene_velocity(track: np.ndarray, rate: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scene velocity (vy, vx) of a screen track (T, 2) (NaN rows = not seen) seen through a camera of `rate`."""
    t_len = track.shape[0]
    path = camera_lib.path_from_rates(rate, t_len)
    cy, cx = height / 2.0, width / 2.0
    s, r = np.exp(path[:, 2]), path[:, 3]
    ry, rx = _rotate_arrays(r, (track[:, 0] - cy) / s, (track[:, 1] - cx) / s)
    qy, qx = cy + path[:, 0] + ry, cx + path[:, 1] + rx
    ok = np.isfinite(qy) & np.isfinite(qx)
    if ok.sum() < 2:
        return np.zeros(2)
    t = np.arange(t_len, dtype=np.float64)[ok]
    return np.array([np.polyfit(t, qy[ok], 1)[0], np.polyfit(t, qx[ok], 1)[0]])


def _rotate_arrays(angle: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return s * x + c * y, c * x - s * y


def score(videos: np.ndarray, metas: Sequence[dict], spec: SyntheticSpec) -> dict[str, float]:
    """Camera metrics of generated (or real) uint8 videos (N, T, H, W, 3) against their clips' metadata."""
    if len(videos) != len(metas):
        raise ValueError(f"{len(videos)} videos but {len(metas)} metas")
    t_len, height, width = videos.shape[1:4]
    hits, n_moving, dir_right, dir_total = 0, 0, 0, 0
    pan_err, zoom_err, roll_err = [], [], []
    obj = {"moving": [0, 0], "static": [0, 0]}  # [right, total]
    for video, meta in zip(videos, metas):
        true = np.asarray(meta.get("camera_rate", [0.0] * camera_lib.CAMERA_DIMS), np.float64)
        pred = estimate_rates(video, spec)
        hits += move_names(pred, t_len) == camera_lib.move_names(true)
        for name in camera_lib.move_names(true):  # each true move's direction, extra estimated moves ignored
            dir_total += 1
            dir_right += name in camera_lib.move_names(pred)
        moving = bool(camera_lib.move_names(true))
        n_moving += moving
        pan_err.append(float(np.hypot(*(pred[:2] - true[:2]))))
        zoom_err.append(100.0 * abs(np.expm1(pred[2]) - np.expm1(true[2])))
        roll_err.append(float(np.degrees(abs(pred[3] - true[3]))))
        tracks = adherence.track(video, spec)
        for o in meta["objects"]:
            part = obj["moving" if moving else "static"]
            part[1] += 1
            if o["colour"] not in tracks:
                continue
            v = scene_velocity(tracks[o["colour"]], pred, height, width)
            if np.abs(v).max() * (t_len - 1) >= adherence._MIN_MOVE_PX:
                part[0] += adherence._direction(v) == o["direction"]
    n = max(len(metas), 1)
    out = {"camera_move_acc": hits / n, "camera_direction_acc": dir_right / max(dir_total, 1),
           "camera_translation_err": float(np.mean(pan_err)),
           "camera_zoom_err": float(np.mean(zoom_err)), "camera_roll_err": float(np.mean(roll_err)),
           "camera_n_moving": float(n_moving), "camera_n": float(len(metas))}
    for part, (right, total) in obj.items():
        out[f"object_direction_acc_{part}_camera"] = right / total if total else float("nan")
    return out
