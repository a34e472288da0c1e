"""The one scorer of generated videos, called by `klingjax-eval` (`eval.cli`) and the in-loop eval (`eval.evaluate`).

`compute_metrics(gen, ref, metrics)` runs a table of metrics on uint8 videos (N, T, H, W, 3); generated video i is
paired with reference video i. Metrics that do not apply (no reference, too few clips, T < 9 for FVD) are skipped
with the reason. Generated sets travel as folders: `write_generated` stores them losslessly (`videos.npy` +
`prompts.txt`), `load_video_folder` reads those and any other folder of videos back, so scoring a written folder
gives the numbers of scoring the videos in memory.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

from klingjax.eval import media
from klingjax.measures import PSNR_CAP, psnr_protocol

VIDEO_EXTS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
ARRAY_EXTS = (".npy", ".npz")
ALL_METRICS = ("fvd", "fid", "kid", "psnr", "ssim", "lpips", "vbstyle", "adherence", "camera")
ADHERENCE_KEYS = ("colour_acc", "shape_acc", "direction_acc", "all_acc", "count_acc", "camera_acc")
GENERATED_VIDEOS, GENERATED_PROMPTS = "videos.npy", "prompts.txt"

# ----------------------------------------------------------------------------- generated-video folders


def write_generated(folder: str | os.PathLike, videos: np.ndarray, captions: Sequence[str]) -> str:
    """Store uint8 videos (N, T, H, W, 3) losslessly as `folder/videos.npy` with `prompts.txt`; returns `folder`."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or len(videos) != len(captions):
        raise ValueError(f"expected uint8 videos (N, T, H, W, 3) for {len(captions)} captions, "
                         f"got {videos.dtype} {videos.shape}")
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, GENERATED_VIDEOS), videos)
    with open(os.path.join(folder, GENERATED_PROMPTS), "w") as f:
        f.write("\n".join(captions) + "\n")
    return os.fspath(folder)


def _load_file(path: pathlib.Path) -> list[np.ndarray]:
    if path.suffix in VIDEO_EXTS:
        return [media.read_video(path)]
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as data:
            if len(data.files) != 1:
                raise ValueError(f"{path}: expected one array in the npz, found {data.files}")
            arr = data[data.files[0]]
    if arr.ndim == 4:
        return [arr]
    if arr.ndim == 5:
        return list(arr)
    raise ValueError(f"{path}: expected (T, H, W, 3) or (N, T, H, W, 3), got shape {arr.shape}")


def load_video_folder(folder: str | os.PathLike, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """All videos of a folder in sorted file order -> uint8 (N, T, H, W, 3) and their names."""
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTS + ARRAY_EXTS)
    if not files:
        raise ValueError(f"no videos in {root} (looked for {', '.join(VIDEO_EXTS + ARRAY_EXTS)})")
    videos, names = [], []
    for path in files:
        for j, video in enumerate(_load_file(path)):
            videos.append(video)
            names.append(path.name if j == 0 else f"{path.name}[{j}]")
        if limit is not None and len(videos) >= limit:
            break
    videos, names = videos[:limit], names[:limit]
    shapes = sorted({v.shape for v in videos})
    if len(shapes) > 1:
        raise ValueError(f"videos in {root} have mixed shapes {shapes}; resize them to one (T, H, W, 3) first")
    arr = np.stack(videos)
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise ValueError(f"videos in {root} must be (T, H, W, 3) RGB, got {arr.shape[1:]}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            bad = [names[i] for i in range(len(arr)) if not np.isfinite(arr[i]).all()]
            raise ValueError(f"videos in {root} contain NaN or Inf: {bad[:5]}")
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"videos in {root} must have values in [0, 255], got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr, names


# ----------------------------------------------------------------------------- metrics


class Skip(Exception):
    """A metric that does not apply to these inputs; the message says why."""


class Scores(NamedTuple):
    """What `compute_metrics` returns: metric values, their protocols, timings (s, items/s) and skip reasons."""

    values: dict[str, float]
    protocols: dict[str, str]
    timings: dict[str, float]
    skipped: dict[str, str]


def _timed(timings: dict, name: str, items: int, fn: Callable):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    timings[f"{name}_s"] = seconds
    timings[f"{name}_items_per_s"] = items / max(seconds, 1e-9)
    return out


def compute_metrics(gen: np.ndarray, ref: np.ndarray | None, metrics: Sequence[str], *, metas=None, spec=None,
                    fid_resize: str = "tf_legacy", fid_frames: int = 4, fps: float = 8.0,
                    consistency: bool = True, recon: np.ndarray | None = None, concept: str = "") -> Scores:
    """Run `metrics` on generated uint8 (N, T, H, W, 3) vs reference videos -> Scores.

    `metas` / `spec`: the synthetic ground truth of the reference clips (a dataset's held-out split), for prompt
    adherence; the detector also scores the reference itself (`adherence_<k>_on_real`: its ceiling).
    `recon`: the VAE's reconstructions of the reference clips (uint8, as `ref`): adherence also scores them
    (`adherence_<k>_on_vae`, the ceiling of any DiT over that VAE) and `vae_psnr` is their PSNR against `ref`.
    `concept`: a colour or shape word; the generated clips' adherence is also reported on the clips that show it
    (`adherence_<k>_with_<word>`) and on the rest (`adherence_<k>_without_<word>`), e.g. for a concept a
    fine-tune taught.
    """
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    out = Scores({}, {}, {}, {})
    values, protocols, timings = out.values, out.protocols, out.timings
    paired = ref is not None and ref.shape == gen.shape

    def need_ref():
        if ref is None:
            raise Skip("needs a reference set (--reference or --dataset)")

    def do_fvd():
        from klingjax.eval.fvd import MIN_FRAMES, fvd

        need_ref()
        if min(len(gen), len(ref)) < 2:
            raise Skip("needs at least 2 clips per set for a covariance")
        if gen.shape[1] < MIN_FRAMES or gen.shape[1:] != ref.shape[1:]:
            raise Skip(f"needs equal (T, H, W) with T >= {MIN_FRAMES}: {gen.shape[1:]} vs {ref.shape[1:]}")
        result = _timed(timings, "fvd", len(gen) + len(ref), lambda: fvd(ref, gen))
        values["fvd"], protocols["fvd"] = result.value, result.protocol

    def do_fid_kid():
        from klingjax.eval import fid as fid_lib

        need_ref()
        real, fake = fid_lib.video_frames(ref, fid_frames), fid_lib.video_frames(gen, fid_frames)
        if min(len(real), len(fake)) < 2:
            raise Skip("needs at least 2 frames per set for a covariance")
        f_real = _timed(timings, "inception_real", len(real),
                        lambda: fid_lib.inception_features(real, resize=fid_resize))
        f_fake = _timed(timings, "inception_fake", len(fake),
                        lambda: fid_lib.inception_features(fake, resize=fid_resize))
        suffix = f"_{min(fid_frames, gen.shape[1])}fpc"  # frames per clip
        if "fid" in metrics:
            r = fid_lib.fid_from_features(f_real, f_fake, fid_resize)
            values["fid"], protocols["fid"] = r.value, r.protocol + suffix
        if "kid" in metrics:
            k = fid_lib.kid_from_features(f_real, f_fake, resize=fid_resize)
            values["kid"], protocols["kid"] = k.value, k.protocol + suffix
            values["kid_std"] = k.std

    def do_paired(name: str):
        from klingjax.eval import image_metrics

        need_ref()
        if not paired:
            raise Skip(f"needs a paired reference of the same shape, got {gen.shape} vs {ref.shape}")
        n, t = gen.shape[:2]
        fn = {"psnr": lambda a, b: image_metrics.psnr(a, b, cap=PSNR_CAP), "ssim": image_metrics.ssim,
              "lpips": image_metrics.lpips}[name]
        per_frame = _timed(timings, name, n * t, lambda: fn(ref, gen))  # (N, T)
        values[name] = float(per_frame.mean())
        protocols[name] = (psnr_protocol(n, t, PSNR_CAP) if name == "psnr"
                           else f"{name}_paired_{n}x{t}f" + ("_alexnet" if name == "lpips" else ""))

    def do_vbstyle():
        from klingjax.eval import vbench_style

        for tag, videos in (("", gen), ("_on_reference", ref)):
            if videos is None:
                continue
            scores = _timed(timings, f"vbstyle{tag}", len(videos),
                            lambda v=videos: vbench_style.evaluate_videos(v, fps=fps, consistency=consistency))
            for key, value in scores.items():
                values[key + tag] = value
                protocols[key + tag] = ("vbench_exact_formula" if key == "temporal_flickering"
                                        else "vbench_style_substitute") + f"_{len(videos)}clips"

    def scored_sets(n: int, *how: str) -> list[tuple[str, np.ndarray, str]]:
        """(tag, videos, how) of what a ground-truth metric scores: the generated clips, and, when given, the
        reference clips (`_on_real`) and the VAE's reconstructions of them (`_on_vae`)."""
        sets = [("", gen, how[0])]
        if ref is not None and len(ref) >= n:
            sets.append(("_on_real", ref[:n], how[1]))
        if recon is not None and len(recon) >= n:
            sets.append(("_on_vae", recon[:n], how[2]))
        return sets

    def do_adherence():
        from klingjax.eval import adherence

        if spec is None or metas is None:
            raise Skip("needs a synthetic dataset (--dataset) for ground-truth metas")
        n = len(gen)
        if len(metas) < n:
            raise Skip(f"{n} generated videos but only {len(metas)} ground-truth metas")
        sets = scored_sets(n, "detector on decoded RGB", "detector on the ground-truth clips: its ceiling",
                           "detector on the VAE's reconstructions: any DiT's ceiling")
        for tag, videos, how in sets:
            scores = _timed(timings, f"adherence{tag}", n, lambda v=videos: adherence.score(v, metas[:n], spec))
            for key in ADHERENCE_KEYS:
                values[f"adherence_{key}{tag}"] = float(scores[key])
                protocols[f"adherence_{key}{tag}"] = f"synthetic ground truth, {n} held-out clips, {how}"
        if not concept:
            return
        shows = [any(concept in (o["colour"], o["shape"]) for o in m["objects"]) for m in metas[:n]]
        for part, want in ((f"_with_{concept}", True), (f"_without_{concept}", False)):
            rows = [i for i in range(n) if shows[i] == want]
            values[f"adherence_n{part}"] = float(len(rows))
            for tag, videos, how in sets if rows else ():
                scores = adherence.score(videos[rows], [metas[i] for i in rows], spec)
                for key in ADHERENCE_KEYS:
                    values[f"adherence_{key}{tag}{part}"] = float(scores[key])
                    protocols[f"adherence_{key}{tag}{part}"] = (
                        f"synthetic ground truth, the {len(rows)} of {n} held-out clips "
                        f"{'showing' if want else 'not showing'} {concept!r}, {how}")

    def do_camera():
        from klingjax.eval import camera_metrics

        if spec is None or metas is None or not any("camera_rate" in m for m in metas):
            raise Skip("needs a synthetic dataset with camera moves (data.p_camera_move > 0)")
        n = len(gen)
        sets = scored_sets(n, "estimated from the generated pixels",
                           "estimator on the ground-truth clips: its own error",
                           "estimator on the VAE's reconstructions: any DiT's floor")
        for tag, videos, how in sets:
            scores = _timed(timings, f"camera{tag}", n, lambda v=videos: camera_metrics.score(v, metas[:n], spec))
            for key, value in scores.items():
                values[f"{key}{tag}"] = float(value)
                protocols[f"{key}{tag}"] = f"synthetic camera ground truth, {n} held-out clips, {how}"

    table: dict[str, Callable[[], None]] = {
        "fvd": do_fvd, "psnr": lambda: do_paired("psnr"), "ssim": lambda: do_paired("ssim"),
        "lpips": lambda: do_paired("lpips"), "vbstyle": do_vbstyle, "adherence": do_adherence,
        "camera": do_camera}
    todo = [(name, table[name]) for name in metrics if name in table]
    if recon is not None and ref is not None:  # the VAE's share of the error, next to the DiT's
        from klingjax.eval import image_metrics

        per_frame = image_metrics.psnr(ref[:len(recon)], recon, cap=PSNR_CAP)  # (N, T)
        values["vae_psnr"] = float(per_frame.mean())
        protocols["vae_psnr"] = "vae reconstruction " + psnr_protocol(*per_frame.shape, PSNR_CAP)
    if "fid" in metrics or "kid" in metrics:
        todo.append(("fid/kid", do_fid_kid))  # one Inception pass for both
    for name, fn in todo:
        try:
            fn()
        except Skip as e:
            out.skipped[name] = str(e)
            logging.warning("skipping %s: %s", name, e)
    return out
