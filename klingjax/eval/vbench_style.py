"""VBench-style video quality dimensions computable offline, named so nobody mistakes them for leaderboard numbers.

Videos are uint8 (T, H, W, 3). Per-video scores; average over a set as VBench does.
  * `temporal_flickering`: VBench's exact formula, (255 - mean_t MAE(frame_t, frame_t+1)) / 255 (a static
    video scores 1.0). VBench computes it on static-prompt videos only; the formula is the same.
  * `vbstyle_dynamic_degree`: VBench's rule (per frame pair, the mean of the top 5% flow magnitudes; the
    video moves when at least round(4 T / 16) pairs exceed 6 * min(H, W) / 256 * max(1, 8 / fps), frames
    subsampled to ~8 fps) with OpenCV DIS optical flow instead of RAFT.
  * `vbstyle_motion_smoothness`: VBench's score (255 - MAE(odd frames, frames interpolated from their even
    neighbours)) / 255 with DIS-flow warping instead of the AMT interpolator.
  * `vbstyle_subject_consistency` / `vbstyle_background_consistency`: VBench's cosine formula (per frame,
    the mean of max(0, cos) to the previous and to the first frame) on TF-Inception pool3 features of the
    whole frame / of the frame's border ring (centre filled with the ring's mean colour) instead of
    DINO / CLIP features.
Exact VBench dimensions (DINO, CLIP, RAFT, AMT, ...) run only through the official `vbench` package from
a user-supplied weights directory (`run_exact_vbench`); nothing downloads here.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np

VBENCH_FPS = 8.0  # VBench subsamples videos to ~8 fps for dynamic degree
# Files each exact dimension needs under the weights dir (VBench's `VBENCH_CACHE_DIR` layout).
EXACT_VBENCH_FILES: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main", "dino_model/dino_vitb16_full.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "clip_model/ViT-L-14.pt"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "temporal_flickering": (),
}


def _check_video(video, name: str = "video", min_frames: int = 2) -> np.ndarray:
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected frames (T, H, W, 3), got shape {arr.shape}")
    if arr.shape[0] < min_frames:
        raise ValueError(f"{name}: needs at least {min_frames} frames, got {arr.shape[0]}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: frames contain NaN or Inf")
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{name}: values must be in [0, 255], got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


# ----------------------------------------------------------------------------- temporal flickering


def temporal_flickering(video) -> float:
    """VBench temporal flickering of uint8 frames (T, H, W, 3): (255 - mean consecutive-frame MAE) / 255."""
    f = _check_video(video).astype(np.float32)
    mae = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))  # (T-1,)
    return float((255.0 - mae.mean()) / 255.0)


# ----------------------------------------------------------------------------- optical flow


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError("vbstyle motion metrics need OpenCV; install `opencv-python-headless`") from e
    return cv2


def dis_flow(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """OpenCV DIS (medium preset) flow (H, W, 2) (dx, dy) with frame0(p) ~ frame1(p + flow(p)); uint8 RGB in."""
    cv2 = _cv2()
    g0 = cv2.cvtColor(np.ascontiguousarray(frame0), cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(np.ascontiguousarray(frame1), cv2.COLOR_RGB2GRAY)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(g0, g1, None)


def _top5_mean_magnitude(flow: np.ndarray) -> float:
    """VBench's per-pair motion score: mean of the largest 5% flow magnitudes."""
    rad = np.sqrt(np.square(flow[..., 0]) + np.square(flow[..., 1])).ravel()
    cut = int(rad.size * 0.05)
    return float(np.mean(np.sort(rad)[::-1][:cut])) if cut > 0 else 0.0


def vbstyle_dynamic_degree(video, fps: float = VBENCH_FPS) -> bool:
    """Whether a video (T, H, W, 3) is dynamic by VBench's thresholds, with DIS flow instead of RAFT."""
    arr = _check_video(video)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = arr[:: max(1, round(fps / VBENCH_FPS))]
    factor = max(1.0, VBENCH_FPS / fps)
    thres = factor * 6.0 * (min(arr.shape[1:3]) / 256.0)
    count_num = round(4 * (len(frames) / 16.0))
    count = 0
    for f0, f1 in zip(frames[:-1], frames[1:]):  # VBench's check_move loop, early exit included
        if _top5_mean_magnitude(dis_flow(f0, f1)) > thres:
            count += 1
        if count >= count_num:
            return True
    return False


def _warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(p) = frame(p + flow(p)), bilinear, border-replicated; (H, W, 3) float32."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(frame.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def vbstyle_motion_smoothness(video) -> float:
    """(255 - MAE(odd frames, DIS-warp interpolation of their even neighbours)) / 255 for (T, H, W, 3), T >= 3."""
    arr = _check_video(video, min_frames=3)
    errors = []
    for i in range(1, arr.shape[0] - 1, 2):
        f0, f2 = arr[i - 1], arr[i + 1]
        forward, backward = dis_flow(f0, f2), dis_flow(f2, f0)
        # The middle frame sees f0 half a step back along the motion and f2 half a step forward.
        mid = 0.5 * (_warp(f0, 0.5 * backward) + _warp(f2, 0.5 * forward))
        pred = np.clip(np.rint(mid), 0, 255)
        errors.append(np.abs(pred - arr[i].astype(np.float32)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


# ----------------------------------------------------------------------------- feature consistency


def consistency_from_features(features: np.ndarray) -> float:
    """VBench consistency of per-frame features (T, D): mean_t>=1 of (max(0, cos_prev) + max(0, cos_first)) / 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected per-frame features (T >= 2, D), got shape {f.shape}")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    prev = np.maximum(0.0, np.sum(f[1:] * f[:-1], axis=1))  # (T-1,)
    first = np.maximum(0.0, f[1:] @ f[0])  # (T-1,)
    return float(np.mean((prev + first) / 2.0))


def border_ring(frames: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Frames (T, H, W, 3) with the central (1 - 2 fraction) box replaced by each frame's ring mean colour (uint8)."""
    arr = np.asarray(frames, np.float32).copy()
    h, w = arr.shape[1:3]
    y0, y1 = int(round(h * fraction)), h - int(round(h * fraction))
    x0, x1 = int(round(w * fraction)), w - int(round(w * fraction))
    ring = np.ones((h, w), bool)
    ring[y0:y1, x0:x1] = False
    mean = arr[:, ring].mean(axis=1)  # (T, 3)
    arr[:, y0:y1, x0:x1] = mean[:, None, None, :]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def vbstyle_consistency(videos, *, resize: str = "tf_legacy", batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per-video `vbstyle_subject_consistency` and `vbstyle_background_consistency` of (N, T, H, W, 3)."""
    from klingjax.eval.fid import inception_features

    arr = np.asarray(videos)
    if arr.ndim != 5 or arr.shape[1] < 2:
        raise ValueError(f"expected videos (N, T >= 2, H, W, 3), got shape {arr.shape}")
    n, t = arr.shape[:2]
    frames = arr.reshape(n * t, *arr.shape[2:])  # (N*T, H, W, 3)
    subject = inception_features(frames, resize=resize, batch_size=batch_size).reshape(n, t, -1)
    background = inception_features(border_ring(frames), resize=resize, batch_size=batch_size).reshape(n, t, -1)
    return {
        "vbstyle_subject_consistency": np.array([consistency_from_features(s) for s in subject]),
        "vbstyle_background_consistency": np.array([consistency_from_features(b) for b in background]),
    }


def evaluate_videos(videos, *, fps: float = VBENCH_FPS, consistency: bool = True) -> dict[str, float]:
    """Mean of every offline dimension over videos (N, T, H, W, 3); dynamic degree is the fraction dynamic."""
    arr = np.asarray(videos)
    if arr.ndim != 5 or arr.shape[0] == 0:
        raise ValueError(f"expected videos (N >= 1, T, H, W, 3), got shape {arr.shape}")
    out = {
        "temporal_flickering": float(np.mean([temporal_flickering(v) for v in arr])),
        "vbstyle_dynamic_degree": float(np.mean([vbstyle_dynamic_degree(v, fps) for v in arr])),
    }
    if arr.shape[1] >= 3:
        out["vbstyle_motion_smoothness"] = float(np.mean([vbstyle_motion_smoothness(v) for v in arr]))
    if consistency:
        out.update({k: float(v.mean()) for k, v in vbstyle_consistency(arr).items()})
    return out


# ----------------------------------------------------------------------------- exact VBench


def check_vbench_weights(weights_dir: str | os.PathLike, dimensions: Sequence[str]) -> pathlib.Path:
    """Validate a user-supplied VBench weights dir for `dimensions`; raises naming every missing file."""
    unknown = sorted(set(dimensions) - set(EXACT_VBENCH_FILES))
    if unknown:
        raise ValueError(f"unknown VBench dimensions {unknown}; supported: {sorted(EXACT_VBENCH_FILES)}")
    root = pathlib.Path(weights_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"VBench weights dir {root} does not exist; exact VBench dimensions need the "
                                "official checkpoints laid out as in VBench's VBENCH_CACHE_DIR (nothing downloads)")
    missing = [f"{d}: {root / rel}" for d in dimensions for rel in EXACT_VBENCH_FILES[d] if not (root / rel).exists()]
    if missing:
        raise FileNotFoundError("exact VBench dimensions need these files in the weights dir (nothing downloads):\n  "
                                + "\n  ".join(missing))
    return root


def run_exact_vbench(videos_dir: str | os.PathLike, dimensions: Sequence[str], weights_dir: str | os.PathLike,
                     *, timeout_s: float | None = None) -> dict[str, float]:
    """Run the official `vbench evaluate` CLI (custom-input mode, local checkpoints only) -> {dimension: score}."""
    root = check_vbench_weights(weights_dir, dimensions)
    exe = shutil.which("vbench")
    if exe is None:
        raise ImportError("exact VBench dimensions need the official `vbench` package and its torch stack "
                          "(`pip install vbench`); klingjax itself never imports torch")
    results: dict[str, float] = {}
    env = dict(os.environ, VBENCH_CACHE_DIR=str(root), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as out:
        for dim in dimensions:
            cmd = [exe, "evaluate", "--videos_path", os.fspath(videos_dir), "--dimension", dim,
                   "--mode", "custom_input", "--load_ckpt_from_local", "True", "--output_path", out]
            subprocess.run(cmd, check=True, env=env, timeout=timeout_s)
            for path in sorted(pathlib.Path(out).glob("*_eval_results.json")):
                with open(path) as f:
                    data = json.load(f)
                if dim in data:
                    results[dim] = float(data[dim][0])
            if dim not in results:
                raise RuntimeError(f"vbench produced no result for {dim} in {out}")
    return results
