"""Metrics of conditioned generation (image-to-video, first+last frame, extension, in/outpainting): pure numpy.

Every function compares uint8 videos (N, T, H, W, 3) with the ground truth or with themselves; the driver that builds
the conditions and generates is `klingjax.eval.task_eval`. Conventions: a causal VAE with temporal factor f maps
latent frame 0 to pixel frame 0 and latent frame j >= 1 to pixel frames f(j-1)+1 .. fj, and spatially each latent
position to an s x s pixel block; a latent frame's "key frame" is `klingjax.data.tasks.key_frame(j)`.
PSNR is `klingjax.measures.psnr`'s formula, capped at `PSNR_CAP` (identical pixels would give inf).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from klingjax.data.synthetic import SyntheticSpec
from klingjax.data.tasks import key_frame
from klingjax.eval.adherence import meta_centroids, score, track
from klingjax.measures import PSNR_CAP, psnr

_EPS = 1e-6  # grey levels; keeps the ratios finite on perfectly still or flat clips


# ---------------------------------------------------------------------------------------------------
# Latent -> pixel geometry
# ---------------------------------------------------------------------------------------------------


def pixel_frames(j: int, temporal_factor: int) -> list[int]:
    """The pixel frames latent frame j covers: [0] for j = 0, else f(j-1)+1 .. fj."""
    return [0] if j == 0 else list(range(temporal_factor * (j - 1) + 1, temporal_factor * j + 1))


def pixel_mask(mask: np.ndarray, num_frames: int, temporal_factor: int, spatial_factor: int, *,
               key_frames_only: bool = False) -> np.ndarray:
    """Latent mask (..., t, h, w) -> pixel mask (..., T, H*s, W*s): the pixels each given latent position covers.

    key_frames_only: a latent frame given as the lone encoding of its key frame (a last frame, a keyframe) covers
    only that pixel frame; the others of its group are generated.
    """
    mask = np.asarray(mask, bool)
    out = np.zeros((*mask.shape[:-3], num_frames, *mask.shape[-2:]), bool)  # (..., T, h, w)
    for j in range(mask.shape[-3]):
        frames = [key_frame(j, temporal_factor)] if key_frames_only else pixel_frames(j, temporal_factor)
        out[..., frames, :, :] = mask[..., j:j + 1, :, :]
    return out.repeat(spatial_factor, axis=-2).repeat(spatial_factor, axis=-1)  # (..., T, H, W)


def given_key_frames(mask: np.ndarray, temporal_factor: int) -> list[int]:
    """Pixel key frames of the latent frames of a (t, h, w) mask that are wholly given."""
    return [key_frame(j, temporal_factor) for j in range(mask.shape[0]) if mask[j].all()]


# ---------------------------------------------------------------------------------------------------
# Fidelity to the condition
# ---------------------------------------------------------------------------------------------------


def frame_psnr(videos: np.ndarray, real: np.ndarray, frames: Sequence[int]) -> np.ndarray:
    """PSNR (dB, capped) per clip of `frames` of videos vs real (N, T, H, W, 3), averaged over the frames -> (N,)."""
    frames = list(frames)
    return psnr(videos[:, frames], real[:, frames], data_range=255.0, cap=PSNR_CAP).mean(-1)


def masked_psnr(videos: np.ndarray, real: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PSNR (dB, capped) per clip over the pixels where mask (N, T, H, W) is True -> (N,); NaN with no pixel."""
    sq = np.square(videos.astype(np.float64) - real.astype(np.float64)).mean(-1)  # (N, T, H, W)
    count = mask.sum((1, 2, 3))  # (N,)
    mse = np.where(mask, sq, 0.0).sum((1, 2, 3)) / np.maximum(count, 1)
    with np.errstate(divide="ignore"):
        value = np.minimum(10.0 * np.log10(255.0**2 / mse), PSNR_CAP)
    return np.where(count > 0, value, np.nan)


def centroid_error(videos: np.ndarray, metas: Sequence[dict], spec: SyntheticSpec,
                   frames: Sequence[int]) -> float:
    """Mean distance (px) between each true object's centroid and the detected one (matched by colour) at `frames`;
    NaN where no object is found in any of them (colour / shape adherence counts those)."""
    errors = []
    for video, meta in zip(videos, metas):
        found = track(video, spec)
        for obj in meta["objects"]:
            if obj["colour"] in found:
                truth = meta_centroids(obj, video.shape[0])[list(frames)]  # (F, 2)
                errors.append(np.linalg.norm(found[obj["colour"]][list(frames)] - truth, axis=-1))
    errors = np.concatenate(errors) if errors else np.array([np.nan])
    return float(np.nanmean(errors)) if np.isfinite(errors).any() else float("nan")


# ---------------------------------------------------------------------------------------------------
# Motion and seams
# ---------------------------------------------------------------------------------------------------


def speed_error(videos: np.ndarray, metas: Sequence[dict], spec: SyntheticSpec, frames: Sequence[int]) -> float:
    """Mean |measured - true| on-screen speed (px / frame) over the objects found (by colour) in `frames`: the
    least-squares centroid velocity there vs `screen_velocity` of the metadata; NaN where none is found."""
    frames = np.asarray(frames)
    errors = []
    for video, meta in zip(videos, metas):
        found = track(video[frames], spec)
        for obj in meta["objects"]:
            centroid = found.get(obj["colour"])
            if centroid is None or np.isfinite(centroid[:, 0]).sum() < 2:
                continue
            ok = np.isfinite(centroid[:, 0])
            velocity = [np.polyfit(frames[ok], centroid[ok, a], 1)[0] for a in (0, 1)]
            errors.append(abs(np.hypot(*velocity) - np.hypot(*obj["screen_velocity"])))
    return float(np.mean(errors)) if errors else float("nan")


def _frame_change(videos: np.ndarray) -> np.ndarray:
    """Mean |frame t+1 - frame t| per clip and frame pair: (N, T, H, W, 3) -> (N, T-1), grey levels."""
    v = videos.astype(np.float32)
    return np.abs(v[:, 1:] - v[:, :-1]).mean((2, 3, 4))


def seam_flicker(videos: np.ndarray, seam: int, new: Sequence[int]) -> np.ndarray:
    """Per clip: the frame change across the seam (frame seam-1 -> seam) / the mean frame change between consecutive
    frames of the new part `new` (sorted pixel frames) -> (N,); 1 = the seam is as smooth as the generated motion."""
    change = _frame_change(videos)  # (N, T-1); change[:, i] is frame i -> i+1
    inside = [i for i in range(len(change[0])) if i in new and i + 1 in new]
    return change[:, seam - 1] / np.maximum(change[:, inside].mean(-1), _EPS)


def _trimmed_mean(x: np.ndarray, trim: float) -> float:
    """Mean of the smallest (1 - trim) fraction of x (at least one value); NaN when x is empty."""
    if not len(x):
        return float("nan")
    return float(np.sort(x)[:max(1, int(len(x) * (1.0 - trim)))].mean())


def seam_ratio(videos: np.ndarray, mask: np.ndarray, trim: float = 0.25) -> np.ndarray:
    """Per clip: |step| between neighbouring pixels across the boundary of mask (N, T, H, W) / |step| of the parallel
    pixel pairs just beside it (one pixel further on each side) -> (N,); 1 = an invisible seam, NaN: no boundary.

    A step across a vertical boundary between columns x and x+1 is compared with the steps x-1 -> x and x+1 -> x+2
    (rows likewise): a pasted region shows up as outsized steps all along the seam, smooth content as steps of one
    size. Both sides are trimmed means (the largest `trim` fraction dropped): a sprite edge that happens to run along
    the seam is a few outsized steps, not the seam.
    """
    v = videos.astype(np.float32)
    out = np.full(len(v), np.nan)
    for i in range(len(v)):
        seam, beside = [], []
        for axis in (1, 2):  # rows (H), columns (W) of (T, H, W, 3)
            n = v.shape[axis + 1]
            step = np.abs(np.diff(v[i], axis=axis)).mean(-1)  # (T, H-1, W) or (T, H, W-1): step j is j -> j+1
            cross = np.diff(mask[i], axis=axis) != 0  # (same): the boundary lies between j and j+1
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - 2), slice(1, n - 1)
            near = np.zeros_like(cross)
            near[tuple(lo)] |= cross[tuple(hi)]  # step j-1 beside a boundary step j
            near[tuple(hi)] |= cross[tuple(lo)]  # step j+1 beside a boundary step j
            seam.append(step[cross])
            beside.append(step[near & ~cross])
        across, nearby = _trimmed_mean(np.concatenate(seam), trim), _trimmed_mean(np.concatenate(beside), trim)
        out[i] = across / max(nearby, _EPS)
    return out


# ---------------------------------------------------------------------------------------------------
# Adherence
# ---------------------------------------------------------------------------------------------------


def adherence(videos: np.ndarray, metas: Sequence[dict], spec: SyntheticSpec) -> dict[str, float]:
    """`adherence.score` rates (colour, shape, direction, count, all) plus colour_shape: every true object found with
    its colour and shape (a shape hit needs the colour matched first, so it is `shape_acc`)."""
    result = score(videos, metas, spec)
    out = {k: result[f"{k}_acc"] for k in ("colour", "shape", "direction", "count", "all")}
    out["colour_shape"] = result["shape_acc"]
    return out
