"""Step curves: what a sampling step buys. Adherence (every field), FVD and wall time per clip at 1, 2, 4, ... steps
for a teacher with each solver and for each distilled student, on the same held-out captions, seeds and scorer as
the in-loop eval (`klingjax.eval.scoring`), in one report.

    klingjax-eval steps --workdir workdirs/demo --out workdirs/demo/steps [--student W ...] [--steps 1,2,4,8,16,25,50]
                        [--samplers euler,heun,dpmpp_2m,unipc] [--num_clips 48] [--no_fvd]

Each row is one (model, solver, step count). `nfe` counts model evaluations per clip with every guidance branch
counted (CFG doubles it; a student has guidance folded in: one per step). `seconds_per_clip` is the wall time of
generation + decode per clip, timed after a warm-up call (compilation excluded). A trajectory student is scored at
the step count it was trained for; a shortcut or mean_flow student at every count. Models with masked-video
conditioning also get `i2v_first_frame_psnr`: image-to-video from each held-out clip's first frame, PSNR of output
frame 0 against it. Writes OUT/step_curves.json, OUT/step_curves.md and OUT/step_curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from klingjax import layout, measures
from klingjax.config import ExperimentConfig
from klingjax.diffusion.distill import DistillMethod
from klingjax.diffusion.samplers import Sampler
from klingjax.eval import scoring
from klingjax.eval.generate import VideoGenerator, load_generator
from klingjax.eval.heldout import load_eval_clips, synthetic_spec
from klingjax.eval.report import write_text_atomic
from klingjax.models.text_encoders import load_text_encoder
from klingjax.sharding.mesh import make_mesh

DEFAULT_STEPS = (1, 2, 4, 8, 16, 25, 50)
DEFAULT_SAMPLERS = ("euler", "heun", "dpmpp_2m", "unipc")
PLOTTED = ("adherence_all_acc", "adherence_colour_acc", "adherence_shape_acc", "adherence_direction_acc",
           "adherence_count_acc", "adherence_camera_acc", "fvd", "i2v_first_frame_psnr")


def evaluations(sampler: Sampler, steps: int, guided: bool) -> int:
    """Model evaluations per clip: Heun's corrector adds one per step but the last; CFG evaluates two branches."""
    n = 2 * steps - 1 if sampler is Sampler.HEUN else steps
    return n * (2 if guided else 1)


def _score_row(exp: ExperimentConfig, gen: VideoGenerator, name: str, real: np.ndarray, captions: list[str],
               metas: list[dict], spec, *, fvd: bool) -> dict:
    s = gen.sample
    bs = min(exp.eval.batch_size, len(captions))
    key = jax.random.key(exp.seed + 1)  # the in-loop eval's key: the same noise for every row
    gen(captions[:bs], key, batch_size=bs)  # compile + warm up
    start = time.perf_counter()
    fake = gen(captions, key, batch_size=bs)
    seconds = (time.perf_counter() - start) / len(captions)
    scores = scoring.compute_metrics(fake, real, ["adherence"] + (["fvd"] if fvd else []), metas=metas, spec=spec,
                                     fps=float(spec.fps))
    guided = s.cfg_scale != 1.0 or s.visual_cfg_scale != 1.0
    row = {"model": name, "sampler": s.sampler.value, "steps": s.num_steps,
           "nfe": evaluations(s.sampler, s.num_steps, guided), "seconds_per_clip": seconds,
           **{k: v for k, v in scores.values.items() if k.startswith("adherence_") and "_on_" not in k or k == "fvd"}}
    if gen.masked_video:
        row["i2v_first_frame_psnr"] = _i2v_psnr(gen, real, captions, key, bs)
    logging.info("step curves: %s", row)
    return row


def _i2v_psnr(gen: VideoGenerator, real: np.ndarray, captions: list[str], key: jax.Array, bs: int) -> float:
    """Image-to-video from each clip's first frame: mean PSNR (dB) of output frame 0 against that frame."""
    z = gen.encode_frames(real, batch_size=bs)  # latent frame 0 = pixel frame 0 encoded alone
    mask = np.zeros(z.shape[:4], bool)
    mask[:, 0] = True
    out = gen(captions, key, batch_size=bs, given=z, given_mask=mask)
    a, b = out[:, 0].astype(np.float32) / 127.5 - 1.0, real[:, 0].astype(np.float32) / 127.5 - 1.0
    return float(np.mean(measures.psnr(a, b, data_range=2.0, cap=measures.PSNR_CAP)))


def _with(gen: VideoGenerator, **sample) -> VideoGenerator:
    return dataclasses.replace(gen, sample=dataclasses.replace(gen.sample, **sample))


def step_curves(workdir: str, out_dir: str, *, students: Sequence[str] = (), steps: Sequence[int] = DEFAULT_STEPS,
                samplers: Sequence[str] = DEFAULT_SAMPLERS, num_clips: int | None = None, fvd: bool = True,
                previous: Sequence[dict] = ()) -> dict:
    """Score the teacher of `workdir` with each of `samplers` at each of `steps`, then each student work dir's
    distilled student; writes the JSON, markdown table and plot into `out_dir` and returns the JSON. `previous`:
    rows of earlier runs (same work dir, captions and seeds) reported with these, e.g. students added later."""
    exp = layout.load_workdir_config(workdir)
    data_dir = layout.data_dir(exp, workdir)
    spec = synthetic_spec(data_dir)
    real, captions, metas = load_eval_clips(exp, data_dir, num_clips or exp.eval.num_clips)
    fvd = fvd and exp.data.num_frames >= 9
    mesh = make_mesh(exp.mesh.sizes)
    text_encoder = load_text_encoder(exp.text_encoder)
    rows = list(previous)
    teacher = load_generator(exp, workdir, mesh, text_encoder=text_encoder)
    for name in samplers:
        for n in steps:
            gen = _with(teacher, sampler=Sampler(name), num_steps=n)
            rows.append(_score_row(exp, gen, "teacher", real, captions, metas, spec, fvd=fvd))
    for sw in students:
        s_exp = layout.load_workdir_config(sw)
        student = load_generator(s_exp, sw, mesh, text_encoder=text_encoder, student=True)
        d = s_exp.distill
        label = f"student:{d.method.value}" + (f"@{d.student_steps[0]}" if d.method is DistillMethod.TRAJECTORY else "")
        counts = d.student_steps[:1] if d.method is DistillMethod.TRAJECTORY else steps
        for n in counts:
            rows.append(_score_row(exp, _with(student, num_steps=n), label, real, captions, metas, spec, fvd=fvd))
    result = {"workdir": os.path.abspath(workdir), "num_clips": len(captions), "teacher_cfg": exp.sample.cfg_scale,
              "students": [os.path.abspath(s) for s in students], "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, "step_curves.json"), json.dumps(result, indent=2))
    write_text_atomic(os.path.join(out_dir, "step_curves.md"), markdown(result))
    plot(result, os.path.join(out_dir, "step_curves.png"))
    return result


def markdown(result: dict) -> str:
    """The rows as a markdown table (accuracies in %)."""
    rows = result["rows"]
    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    head = ["model", "sampler", "steps", "nfe", "s/clip"] + [k.replace("adherence_", "").replace("_acc", "")
                                                             for k in keys]
    lines = [f"# Step curves ({result['num_clips']} held-out captions, teacher cfg {result['teacher_cfg']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["sampler"], str(r["steps"]), str(r["nfe"]), f"{r['seconds_per_clip']:.3f}"]
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else f"{100 * v:.1f}" if k.startswith("adherence_") else f"{v:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """One panel per plotted metric: value vs steps (log x), one line per (model, solver)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    curves: dict[str, list[dict]] = {}
    for r in rows:
        curves.setdefault(f"{r['model']} {r['sampler']}", []).append(r)
    for ax, key in zip(axes[0], keys):
        for label, rs in curves.items():
            rs = sorted((r for r in rs if key in r), key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rs], [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(key.replace("adherence_", ""))
        ax.set_xlabel("steps")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str]) -> dict:
    """`klingjax-eval steps ...`: flags -> `step_curves`; returns {"metrics": rows, ...} (the CLI prints rows)."""
    import argparse

    p = argparse.ArgumentParser(prog="klingjax-eval steps", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the teacher's klingjax-train work dir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--student", action="append", default=[], help="a work dir with a distilled student; repeatable")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="comma-separated step counts")
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS), help="the teacher's solvers, comma-separated")
    p.add_argument("--num_clips", type=int, help="held-out captions (default: the config's eval.num_clips)")
    p.add_argument("--no_fvd", action="store_true", help="adherence and time only")
    p.add_argument("--rows_from", action="append", default=[], help="an earlier step_curves.json of the same work "
                   "dir whose rows join this report (e.g. the teacher's, when adding students); repeatable")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
    except ValueError:
        raise SystemExit(f"klingjax-eval steps: --steps {args.steps!r} must be comma-separated integers") from None
    if not steps or min(steps) < 1:
        raise SystemExit(f"klingjax-eval steps: --steps {args.steps!r} must be integers >= 1")
    samplers = [s for s in args.samplers.split(",") if s]
    teacher_solvers = [s.value for s in Sampler if s is not Sampler.FLOW_MAP]
    if bad := sorted(set(samplers) - set(teacher_solvers)):
        raise SystemExit(f"klingjax-eval steps: --samplers {bad} unknown; choose from {teacher_solvers}")
    for sw in args.student:
        if not os.path.isdir(layout.checkpoint_dir(sw, "distill")):
            raise SystemExit(f"klingjax-eval steps: --student {sw} has no distill/checkpoints")
    previous = []
    for path in args.rows_from:
        with open(path) as f:
            earlier = json.load(f)
        if earlier["workdir"] != os.path.abspath(args.workdir):
            raise SystemExit(f"klingjax-eval steps: --rows_from {path} scored {earlier['workdir']}, not {args.workdir}")
        previous += earlier["rows"]
    result = step_curves(args.workdir, args.out, students=args.student, steps=steps, samplers=samplers,
                         num_clips=args.num_clips, fvd=not args.no_fvd, previous=previous)
    return {"metrics": result["rows"], **result}
