"""Drift of minutes-long generated videos: per-window adherence, background fidelity, sharpness and seam flicker.

A model extends a video chunk by chunk; `DriftMeter` is fed those chunks and scores consecutive windows of `window`
frames (e.g. 2 s) against the closed-form ground truth of a bouncing-sprite `LongClip` (klingjax.data.synthetic.
bounce). It streams: it holds the current window's frames and the last frame before it, never the whole video.

Per window (the detector is `klingjax.eval.adherence`'s, objects matched to the truth sprites by colour):
- colour: every truth sprite's colour is detected; shape: each of them has its truth shape (template fit on its clear
  frames, see below); count: the number of detected objects is the number of truth sprites; all: colour, count and
  direction at once. Shape is reported but left out of `all`: at 32x32 a VAE with 8x spatial compression keeps too
  little of a 9-13 px sprite's outline for the detector (its reconstructions of real clips score ~19% on shape, chance
  is 33%), so shape would cap every method at that ceiling and hide the drift of the rest.
- direction ("direction after each bounce", physics-consistent): judged on the generated video's own track, since a
  rollout's phase legitimately drifts from the truth's. Per truth sprite, its clear frames are those the detector finds
  it in (`valid`) and either not within 2 px of another detected object or with >= 90% of its 90th-percentile area
  (an object partly hidden behind another has a biased centroid). On its centroid along the truth axis it is right
  iff (a) it moves: median |velocity| >= 0.3 px/frame; (b) along the axis: the off-axis centroid range is < 2 px;
  (c) every reversal of the velocity's sign (both sides >= 0.3 px/frame: jitter is ignored) happens at the edge it
  moved towards: its alpha > 0.5 extent comes within 3 px of that frame border in some frame around the reversal.
  A sprite found in fewer than 3 frames (or all of a shorter window) is wrong; one found but with < 3 clear frames
  (hidden behind another sprite most of the window) is not judged.
- bg_psnr: PSNR (dB, capped at `PSNR_CAP`) against `truth.background_frame()` on the background pixels (neither the
  generated frame's foreground nor a truth sprite, both grown by 2 px), averaged over frames.
- sharpness: mean over frames of the 95th percentile of the gradient magnitude (np.gradient per channel, RMS over
  the channels: an edge between two colours of one brightness counts too; grey levels / px) inside the generated
  frame's foreground grown by 2 px: the sprite's edge contrast. Raw, so it depends on the clip's colours: compare
  a clip's curve with itself over time (or with the ground truth's); higher = sharper, 0 without any sprite.
- flicker: mean |frame t - frame t-1| (grey levels, all channels) on pixels that are background in both frames, over
  the pairs ending in the window. seam pairs: (the last frame before a chunk seam, the first after); in-chunk pairs:
  every other one. seam_ratio = (seam + 0.5) / (in-chunk + 0.5): half a grey level (uint8 rounding) is the floor, so
  a static exact background gives 1, not 0 / 0.
- occluded: 1 where a truth sprite is over half hidden behind another in some frame of the window (computed from the
  truth's geometry): the detector may lose or misjudge it there, so even the ground truth can score < 100%.
Elsewhere (one sprite, or sprites that never overlap that much) the ground truth scores 100% in every window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from klingjax.data.synthetic import rasterize
from klingjax.data.synthetic.bounce import LongClip
from klingjax.eval.adherence import _classify_shape, _dilate, _extract
from klingjax.eval.task_metrics import masked_psnr

ACCURACIES = ("all", "colour", "shape", "count", "direction")
CURVES = (*ACCURACIES, "bg_psnr", "sharpness", "flicker")
_NEAR_PX = 2  # px a foreground / sprite mask is grown by (blur, anti-aliasing) and the contact distance of sprites
_MIN_SPEED = 0.3  # px / frame: a moving sprite (half the slowest default speed, 0.6) and a clear velocity sign
_MAX_OFF_AXIS = 2.0  # px: centroid range across the axis of motion (ground truth: < 0.2)
_EDGE_TOL = 3  # px between the alpha extent and the border at a reversal (ground truth: 1-2 at speeds <= 2)
_WHOLE = 0.9  # area fraction of the object's 90th-percentile area at which a touching object is not hidden
_MIN_TRACK = 3  # clear frames (two velocities) for a direction judgement
_FLICKER_FLOOR = 0.5  # grey levels added to both sides of seam_ratio


def _contact(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per (T, H, W) mask, (T,) True where it comes within `_NEAR_PX` of another mask."""
    out = []
    for i, mask in enumerate(masks):
        near, hit = _dilate(mask, _NEAR_PX), np.zeros(len(mask), bool)
        for other in masks[:i] + masks[i + 1:]:
            hit |= (near & other).any((1, 2))
        out.append(hit)
    return out


def _hidden(rasters: Sequence[np.ndarray]) -> bool:
    """Whether a truth sprite (coverage (T, H, W) each, in drawing order) is over half hidden by later ones in a
    frame."""
    for i, r in enumerate(rasters):
        visible = r * np.prod([1.0 - later for later in rasters[i + 1:]] or [np.ones_like(r)], axis=0)
        if np.any(visible.sum((1, 2)) < 0.5 * r.sum((1, 2))):
            return True
    return False


def _edge_distance(mask: np.ndarray, axis: int, high: bool) -> float:
    """Least px, over frames of mask (F, H, W), between the mask's extent along `axis` and the low / high border."""
    profile = mask.any(2 - axis)  # (F, L): occupied rows (axis 0) or columns (axis 1)
    out = np.inf
    for p in profile:
        idx = np.flatnonzero(p)
        if len(idx):
            out = min(out, len(p) - 1 - idx[-1] if high else idx[0])
    return float(out)


def direction_ok(centroid: np.ndarray, alpha: np.ndarray, clear: np.ndarray, axis: int) -> bool | None:
    """Physics-consistent motion of one object: centroid (T, 2), alpha (T, H, W), clear (T,) frames, truth axis.
    None with fewer than `_MIN_TRACK` clear frames (see the module docstring for the three conditions)."""
    t = np.flatnonzero(clear)
    if len(t) < _MIN_TRACK:
        return None
    velocity = np.diff(centroid[t, axis]) / np.diff(t)  # (n-1,) px / frame along the axis
    if np.median(np.abs(velocity)) < _MIN_SPEED or np.ptp(centroid[t, 1 - axis]) >= _MAX_OFF_AXIS:
        return False
    moving = np.flatnonzero(np.abs(velocity) >= _MIN_SPEED)
    for k0, k1 in zip(moving[:-1], moving[1:]):
        if np.sign(velocity[k0]) != np.sign(velocity[k1]):  # reversal between frames t[k0] and t[k1 + 1]
            span = alpha[t[k0]:t[k1 + 1] + 1] > 0.5
            if _edge_distance(span, axis, high=velocity[k0] > 0) > _EDGE_TOL:
                return False
    return True


def measure_window(frames: np.ndarray, truth: LongClip, start: int) -> tuple[dict, np.ndarray]:
    """Scores of one window: uint8 frames (T, H, W, 3) of the generated video starting at frame `start`, vs `truth`.
    Returns the per-window values (every `CURVES` key but flicker, plus occluded) and the background mask (T, H, W)."""
    spec, t_len = truth.spec, len(frames)
    _, _, foreground, objects = _extract(frames, spec)
    contact = _contact([o["alpha"] > 0.5 for o in objects])
    by_colour = {o["colour"]: (o, c) for o, c in zip(objects, contact)}
    t = np.arange(start, start + t_len, dtype=np.float64)
    rasters = [rasterize(s.shape, s.size, s.top_left(t).astype(np.float32), spec.height, spec.width)
               for s in truth.sprites]  # (T, H, W) coverage each, drawn in this order
    colour = shape = direction = True
    for sprite in truth.sprites:
        if sprite.colour not in by_colour:
            colour = shape = direction = False
            continue
        obj, touching = by_colour[sprite.colour]
        whole = obj["area"] >= _WHOLE * np.percentile(obj["area"], 90)  # (T,): not partly hidden
        clear = obj["valid"] & (~touching | whole)
        shape &= _classify_shape(obj["alpha"], obj["centroid"], clear if clear.any() else obj["valid"],
                                 spec.shapes) == sprite.shape
        ok = direction_ok(obj["centroid"], obj["alpha"], clear, sprite.axis)
        direction &= ok if ok is not None else int(obj["valid"].sum()) >= min(_MIN_TRACK, t_len)
    count = len(objects) == len(truth.sprites)

    near = _dilate(foreground, _NEAR_PX)
    background = ~near & ~_dilate(np.any([r > 0 for r in rasters], axis=0), _NEAR_PX)  # (T, H, W)
    bg_frame = np.broadcast_to(truth.background_frame(), frames.shape)
    bg_psnr = masked_psnr(frames[:, None], bg_frame[:, None], background[:, None])  # (T,), NaN: no background
    gy, gx = np.gradient(frames.astype(np.float32), axis=(1, 2))  # (T, H, W, 3) each
    magnitude = np.sqrt(np.mean(gy * gy + gx * gx, -1))  # (T, H, W) grey levels / px, colour edges included
    sharp = [np.percentile(m[r], 95) for m, r in zip(magnitude, near) if r.any()]
    scores = {"colour": colour, "shape": shape, "count": count, "direction": direction,
              "all": colour and count and direction,  # shape is left out: see the module docstring
              "bg_psnr": float(np.nanmean(bg_psnr)) if np.isfinite(bg_psnr).any() else 0.0,
              "sharpness": float(np.mean(sharp)) if sharp else 0.0,
              "occluded": _hidden(rasters)}
    return scores, ~near


def pair_flicker(a: np.ndarray, b: np.ndarray, background_a: np.ndarray, background_b: np.ndarray) -> float:
    """Mean |b - a| (grey levels, all channels) of two uint8 frames (H, W, 3) on pixels background in both."""
    both = background_a & background_b
    if not both.any():
        return 0.0
    return float(np.abs(b.astype(np.float32) - a.astype(np.float32))[both].mean())


class DriftMeter:
    """Per-window drift metrics of one generated long video against its LongClip ground truth, fed chunk by chunk.

    Windows are frames [0, window), [window, 2 window), ...; each is scored once it is complete (`result` scores a
    final partial one of >= 2 frames; a lone last frame is dropped). Frames past `truth.num_frames` are still scored
    (the truth is closed-form). Feeding the frames in one `update` or in chunks gives the same per-window values.
    """

    def __init__(self, truth: LongClip, *, window: int, fps: float):
        if window < 2:
            raise ValueError(f"window must be >= 2 frames, got {window}")
        self.truth, self.window, self.fps = truth, int(window), float(fps)
        self._buffer: list[np.ndarray] = []  # frames of the current window
        self._start = 0  # first frame of the current window
        self._seams: set[int] = set()  # frames of the current window that start a chunk after a seam
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # last scored frame and its background mask
        self._windows: list[dict] = []
        self._pairs = {"seam": [0.0, 0], "inchunk": [0.0, 0]}  # sum, count
        self.num_frames = self.num_seams = 0

    def update(self, frames: np.ndarray, *, seam: bool = False) -> None:
        """Feed the next n >= 1 consecutive frames, uint8 (n, H, W, 3); seam: a chunk seam precedes frames[0]."""
        frames = np.asarray(frames)
        shape = (self.truth.spec.height, self.truth.spec.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != shape or not len(frames):
            raise ValueError(f"expected uint8 frames (n >= 1, {', '.join(map(str, shape))}), got {frames.shape}")
        if seam and self.num_frames > 0:
            self._seams.add(self.num_frames)
            self.num_seams += 1
        self.num_frames += len(frames)
        self._buffer.append(frames.astype(np.uint8))
        if sum(len(f) for f in self._buffer) < self.window:
            return
        block, done = np.concatenate(self._buffer), 0
        while len(block) - done >= self.window:
            scores, pairs, self._last = self._score(block[done:done + self.window])
            self._windows.append(scores)
            for kind, value in pairs:
                self._pairs[kind][0] += value
                self._pairs[kind][1] += 1
            done += self.window
            self._start += self.window
        self._seams = {s for s in self._seams if s >= self._start}
        self._buffer = [block[done:].copy()]  # a copy: the consumed frames are freed

    def _score(self, frames: np.ndarray) -> tuple[dict, list[tuple[str, float]], tuple[np.ndarray, np.ndarray]]:
        """One window's scores (flicker included), its (kind, flicker) frame pairs and its last frame + mask."""
        scores, background = measure_window(frames, self.truth, self._start)
        pairs = []
        previous = self._last
        for i, frame in enumerate(frames):
            if previous is not None:
                kind = "seam" if self._start + i in self._seams else "inchunk"
                pairs.append((kind, pair_flicker(previous[0], frame, previous[1], background[i])))
            previous = (frame, background[i])
        scores["flicker"] = float(np.mean([v for _, v in pairs])) if pairs else 0.0
        scores["time_s"] = self._start / self.fps
        return scores, pairs, (frames[-1].copy(), background[-1].copy())

    def result(self) -> dict:
        """JSON-serialisable: per-window lists time_s (window start, s), colour, shape, count, direction, all (0 / 1),
        bg_psnr, sharpness, flicker, occluded; over the whole video seam_flicker, inchunk_flicker (no seam: seam =
        in-chunk), seam_ratio, num_frames, num_seams, fps, window. Scores a pending partial window without consuming
        it: the meter can keep updating."""
        windows, sums = list(self._windows), {k: list(v) for k, v in self._pairs.items()}
        held = sum(len(f) for f in self._buffer)
        if held >= 2:
            scores, pairs, _ = self._score(np.concatenate(self._buffer))
            windows.append(scores)
            for kind, value in pairs:
                sums[kind][0] += value
                sums[kind][1] += 1
        inchunk = sums["inchunk"][0] / max(sums["inchunk"][1], 1)
        seam = sums["seam"][0] / sums["seam"][1] if sums["seam"][1] else inchunk
        out = {k: [int(w[k]) if k in ACCURACIES else float(w[k]) for w in windows]
               for k in ("time_s", *CURVES)}
        out["occluded"] = [int(w["occluded"]) for w in windows]
        out.update(seam_flicker=float(seam), inchunk_flicker=float(inchunk),
                   seam_ratio=float((seam + _FLICKER_FLOOR) / (inchunk + _FLICKER_FLOOR)),
                   num_frames=self.num_frames, num_seams=self.num_seams, fps=self.fps, window=self.window)
        return out


def _slope_per_min(time_s: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of values vs time, per minute; 0 with fewer than two windows."""
    return float(np.round(np.polyfit(time_s / 60.0, values, 1)[0], 9)) + 0.0 if len(time_s) >= 2 else 0.0  # no -0


def summarise(results: Sequence[dict], *, first_s: float = 10.0, last_s: float = 60.0) -> dict:
    """Mean over clips (`DriftMeter.result`s of one method, same fps and window) per window: curves (accuracies in
    percent), means over the windows starting before `first_s` ("first") and at or after duration - `last_s`
    ("last", duration = the shortest video's length in s), least-squares slopes per minute (accuracy points or dB;
    negative = lost) and the mean seam flicker. Clips with fewer windows truncate the curves to theirs."""
    if not results:
        raise ValueError("summarise needs at least one result")
    n = min(len(r["time_s"]) for r in results)
    time_s = np.asarray(results[0]["time_s"][:n], np.float64)
    curves = {"time_s": time_s.tolist()}
    for key in CURVES:
        mean = np.mean([np.asarray(r[key][:n], np.float64) for r in results], axis=0)
        curves[key] = (mean * (100.0 if key in ACCURACIES else 1.0)).tolist()
    duration = min(r["num_frames"] / r["fps"] for r in results)
    first, last = time_s < first_s, time_s >= duration - last_s
    keys = (*ACCURACIES, "bg_psnr")

    def over(mask: np.ndarray) -> dict:
        return {k: float(np.mean(np.asarray(curves[k])[mask])) if mask.any() else float("nan") for k in keys}

    return {"curves": curves, "first": over(first), "last": over(last), "first_s": first_s, "last_s": last_s,
            "slope_per_min": {k: _slope_per_min(time_s, np.asarray(curves[k])) for k in keys},
            "duration_s": float(duration), "num_clips": len(results),
            **{k: float(np.mean([r[k] for r in results])) for k in ("seam_ratio", "seam_flicker", "inchunk_flicker")}}


def plot_curves(summaries: Mapping[str, dict], path: str) -> None:
    """One PNG: accuracy (all solid, direction dashed, colour dotted) vs time per method, bg PSNR vs time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, bg) = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for i, (name, s) in enumerate(summaries.items()):
        c, x = s["curves"], s["curves"]["time_s"]
        colour = f"C{i % 10}"
        acc.plot(x, c["all"], color=colour, label=f"{name} all ({s['slope_per_min']['all']:+.1f} pts/min)")
        acc.plot(x, c["direction"], color=colour, linestyle="--", label=f"{name} direction")
        acc.plot(x, c["colour"], color=colour, linestyle=":", label=f"{name} colour")
        bg.plot(x, c["bg_psnr"], color=colour, label=f"{name} ({s['slope_per_min']['bg_psnr']:+.2f} dB/min)")
    acc.set(title="accuracy per window", xlabel="time (s)", ylabel="%", ylim=(-2, 102))
    bg.set(title="background PSNR", xlabel="time (s)", ylabel="dB")
    acc.legend(fontsize=6)
    bg.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summaries: Mapping[str, dict], path: str) -> None:
    """A markdown table: per method, first / last accuracies (%), slope of all, bg PSNR first / last, seam ratio."""
    any_summary = next(iter(summaries.values()), {"first_s": 10.0, "last_s": 60.0})
    head = [f"first {any_summary['first_s']:g} s", f"last {any_summary['last_s']:g} s"]
    cols = [f"{h} {k}" for h in head for k in ACCURACIES]
    lines = ["| method | " + " | ".join(cols) + " | slope all (pts/min) | bg PSNR first | bg PSNR last | seam ratio |",
             "|---" * (len(cols) + 5) + "|"]
    for name, s in summaries.items():
        values = [f"{s[part][k]:.1f}" for part in ("first", "last") for k in ACCURACIES]
        lines.append(f"| {name} | " + " | ".join(values) + f" | {s['slope_per_min']['all']:+.2f} | "
                     f"{s['first']['bg_psnr']:.1f} | {s['last']['bg_psnr']:.1f} | {s['seam_ratio']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
