"""Long-video benchmark (issue 16): constant-memory rollouts and drift per minute of each anti-drift method.

    python benchmarks/long_video.py --workdir W [--clips 8] [--seconds 120] [--short 10] [--window 2]
                                    [--methods none,renoise0.05,colour,renoise0.05+colour] [--out DIR]

W: a work dir trained by experiments/long_video.py (bouncing sprites, extension, dit.context_noise).

1. Memory and speed, 2 minutes vs 10 seconds: each length is generated in its own fresh process (peak RSS is a
   process-lifetime figure), batch 1, from text, method `none`, streamed into an mp4 as klingjax-generate --duration
   does. One short rollout first compiles every program (warm-up, not timed); then the timed rollout: wall time per
   generated second, peak host RSS (ru_maxrss), and peak device memory where the backend reports it (on CPU the
   device memory is the host memory: the RSS row covers both).
2. Drift: --clips held-out long clips (klingjax.data.synthetic.bounce: exact per-frame ground truth) of --seconds
   each, rolled out from their first context frames with every method on the same model and key, scored per
   --window seconds (klingjax/eval/drift.py): attribute accuracy, background PSNR, sharpness, flicker at seams vs
   inside chunks; the slope in points per minute. Report, plot and one example mp4 per method in --out.

Ends with one `GOAL` line per goal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GOAL_MEMORY, GOAL_TIME, GOAL_DRIFT_PTS, GOAL_SEAM = 1.10, 1.10, 5.0, 1.2
MIN_START = 50.0  # % all-attribute accuracy in the first windows for the drift goal to be judged


def parse_method(name: str):
    """'none' | 'renoise<level>' | 'colour' | 'colour_smooth' | 'stream' | '<a>+<b>' -> RolloutConfig."""
    from klingjax.eval.rollout import RolloutConfig

    noise, anchor, decode = 0.0, "none", "chunk"
    for part in name.split("+"):
        if part.startswith("renoise"):
            noise = float(part.removeprefix("renoise"))
        elif part in ("colour", "colour_smooth", "none", "stream"):
            anchor = part if part.startswith("colour") else anchor
            decode = "stream" if part == "stream" else decode
        else:
            raise SystemExit(f"--methods: unknown method {part!r} (none, renoise<level>, colour, colour_smooth, "
                             "stream, a+b)")
    return RolloutConfig(context=2, context_noise=noise, anchor=anchor, decode=decode)


def measure(workdir: str, seconds: float, out: str) -> dict:
    """One timed rollout of `seconds` in this process (after a warm-up rollout of two chunks)."""
    import jax

    from klingjax.eval import media
    from klingjax.eval.generate import load_workdir_generator
    from klingjax.eval.generate_requests import dataset_fps
    from klingjax.eval.rollout import rollout

    exp, gen = load_workdir_generator(workdir)
    fps = dataset_fps(exp, workdir)
    prompt = ["a red circle bounces left and right on a black background"]
    num_frames = 1 + gen.vae.cfg.temporal_factor * (gen.latent_shape[0] - 1)
    for _ in rollout(gen, prompt, jax.random.key(1), num_frames + 2, fps=fps, quiet=True):  # compiles everything
        pass
    total = round(seconds * fps)
    start = time.perf_counter()
    with media.mp4_stream(out, fps) as write:
        for frames, _ in rollout(gen, prompt, jax.random.key(0), total, fps=fps, quiet=True):
            write(frames[0])
    wall = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    return {"seconds": seconds, "frames": total, "wall_s": wall, "wall_per_video_s": wall / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mib": stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None}


def _child(workdir: str, seconds: float, out_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--workdir", workdir, "--_measure", str(seconds), "--out", out_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measuring {seconds} s failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--short", type=float, default=10.0)
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--methods", default="none,renoise0.05,colour,renoise0.05+colour")
    p.add_argument("--out", default="/tmp/long_video_bench")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_drift", action="store_true")
    p.add_argument("--_measure", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args._measure is not None:
        print(json.dumps(measure(args.workdir, args._measure, os.path.join(args.out, f"{args._measure:g}s.mp4"))))
        return
    lines = []
    if not args.skip_memory:
        short, long = (_child(args.workdir, s, args.out) for s in (args.short, args.seconds))
        print("| length | frames | wall | wall per generated second | peak RSS | peak device memory |")
        print("|---|---|---|---|---|---|")
        for r in (short, long):
            dev = "n/a (CPU: host)" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.1f} MiB"
            print(f"| {r['seconds']:g} s | {r['frames']} | {r['wall_s']:.1f} s | {r['wall_per_video_s']:.3f} s | "
                  f"{r['peak_rss_mib']:.0f} MiB | {dev} |")
        rss = long["peak_rss_mib"] / short["peak_rss_mib"]
        per = long["wall_per_video_s"] / short["wall_per_video_s"]
        lines.append(f"GOAL long_host_rss: {args.seconds:g} s / {args.short:g} s peak RSS {rss:.3f} "
                     f"({long['peak_rss_mib']:.0f} vs {short['peak_rss_mib']:.0f} MiB) (goal <= {GOAL_MEMORY}) "
                     f"{'MET' if rss <= GOAL_MEMORY else 'NOT MET'}")
        if short["peak_device_mib"] is not None:
            dev = long["peak_device_mib"] / short["peak_device_mib"]
            lines.append(f"GOAL long_device_memory: {dev:.3f} (goal <= {GOAL_MEMORY}) "
                         f"{'MET' if dev <= GOAL_MEMORY else 'NOT MET'}")
        lines.append(f"GOAL long_time_per_second: {per:.3f}x ({long['wall_per_video_s']:.3f} vs "
                     f"{short['wall_per_video_s']:.3f} s per generated second) (goal <= {GOAL_TIME}x) "
                     f"{'MET' if per <= GOAL_TIME else 'NOT MET'}")
    if not args.skip_drift:
        from klingjax import layout
        from klingjax.eval import long_video
        from klingjax.eval.generate import load_workdir_generator
        from klingjax.eval.heldout import synthetic_spec

        exp, gen = load_workdir_generator(args.workdir)
        spec = synthetic_spec(layout.data_dir(exp, args.workdir))
        truths = long_video.truth_clips(spec, exp.seed, args.clips, args.seconds)
        configs = [parse_method(m) for m in args.methods.split(",")]
        start = time.perf_counter()
        summaries = long_video.compare(gen, truths, configs, out_dir=args.out, window_s=args.window)
        print(f"drift: {len(configs)} methods x {args.clips} clips x {args.seconds:g} s in "
              f"{time.perf_counter() - start:.0f} s; report {args.out}/report.md, plot {args.out}/drift.png")
        print(open(os.path.join(args.out, "report.md")).read())
        drops = {n: s["first"]["all"] - s["last"]["all"] for n, s in summaries.items() if n != "vae (ceiling)"}
        # The best method: the highest last-minute accuracy (then the smallest drop, then the calmest seams).
        best = max(drops, key=lambda n: (summaries[n]["last"]["all"], -drops[n], -summaries[n]["seam_ratio"]))
        s = summaries[best]
        # A model that does not do the task at the start (first windows below MIN_START) cannot show it holds up.
        held = drops[best] <= GOAL_DRIFT_PTS and s["first"]["all"] >= MIN_START
        lines.append(f"GOAL drift_last_minute ({best}): last minute all-attribute accuracy {s['last']['all']:.1f}% vs "
                     f"first {s['first_s']:g} s {s['first']['all']:.1f}% = {-drops[best]:+.1f} pts "
                     f"(goal within {GOAL_DRIFT_PTS:g}, from a start >= {MIN_START:g}%) {'MET' if held else 'NOT MET'}")
        lines.append(f"GOAL seam_flicker ({best}): seam / in-chunk flicker {s['seam_ratio']:.2f} (goal <= "
                     f"{GOAL_SEAM}) {'MET' if s['seam_ratio'] <= GOAL_SEAM else 'NOT MET'}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
