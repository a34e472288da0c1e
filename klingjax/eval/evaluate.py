"""Evaluate a trained text-to-video pipeline on held-out captions: FVD, prompt adherence, media, report.

The in-loop eval of `klingjax.experiment`: it generates, writes the clips as `klingjax-eval` reads them and scores
them with the same scorer (`klingjax.eval.scoring`). The held-out clip loaders here serve the CLI too.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from klingjax import layout
from klingjax.config import ExperimentConfig
from klingjax.data.synthetic.camera import camera_condition, latent_frame_rows
from klingjax.eval import media, scoring, task_eval
from klingjax.eval.generate import VideoGenerator
from klingjax.eval.heldout import load_eval_clips, load_heldout_clips, synthetic_spec  # noqa: F401 (re-exported)
from klingjax.eval.report import scorer_sections, write_report, write_text_atomic
from klingjax.models.conditions import CameraCondition

GENERATED_DIR = ("eval", "generated")  # under out_dir: the generated clips, in `klingjax-eval --generated` format
TASKS_DIR = ("eval", "tasks")  # under out_dir: the per-task card of a masked-video model (`task_eval`)


def evaluate(exp: ExperimentConfig, generator: VideoGenerator, *, data_dir: str, out_dir: str,
             extra_metrics: dict | None = None) -> dict:
    """Generate one clip per held-out caption, write them to `out_dir/eval/generated`, score them with the
    `klingjax-eval` scorer and write `out_dir/report.md` + media; returns metrics.

    `klingjax-eval --generated OUT_DIR/eval/generated --dataset DATA_DIR --metrics adherence[,fvd]` reproduces
    the metric values (the videos are stored losslessly) except the VAE's own (`*_on_vae`, `vae_psnr`). A model
    trained on masked-video tasks besides t2v also gets the per-task evaluation (`task_eval.evaluate_tasks` into
    `out_dir/eval/tasks`, `<task>/<metric>` metrics, its card a section of the report).
    """
    spec = synthetic_spec(data_dir)
    real, captions, metas = load_eval_clips(exp, data_dir, exp.eval.num_clips)
    logging.info("eval: generating %d clips", len(captions))
    camera = None
    if getattr(generator, "dit", None) is not None and generator.dit.cfg.conditions.camera is not CameraCondition.OFF:
        rows = latent_frame_rows(exp.data.num_frames, layout.vae_config(exp).temporal_factor)
        camera = np.stack([camera_condition(m, tuple(rows)) for m in metas])  # each clip's own camera path
    extra = {} if camera is None else {"camera": camera}
    fake = generator(captions, jax.random.key(exp.seed + 1), batch_size=exp.eval.batch_size, **extra)
    folder = os.path.join(out_dir, *GENERATED_DIR)
    if jax.process_index() == 0:  # every process generated and scores the same clips; host 0 alone writes
        scoring.write_generated(folder, fake, captions)
    # The reference is the held-out clips: adherence also scores them (`adherence_<k>_on_real`, its ceiling) and
    # the VAE's reconstructions of them (`adherence_<k>_on_vae`: the ceiling of any DiT over this VAE, and
    # `vae_psnr`), when the generator has a VAE.
    bs = exp.eval.batch_size
    recon = None
    if getattr(generator, "vae", None) is not None:
        recon = generator.decode(generator.encode(real, batch_size=bs), batch_size=bs)
    names = ["adherence"] + (["fvd"] if exp.eval.fvd else []) + (["camera"] if spec.p_camera_move > 0 else [])
    scores = scoring.compute_metrics(fake, real, names, metas=metas, spec=spec, fps=float(spec.fps), recon=recon,
                                     concept=exp.eval.concept)
    metrics = {**scores.values, **(extra_metrics or {})}
    sections = {}
    if set(task_eval.mixture_tasks(exp)) - {"t2v"}:  # t2v alone is what the clips above measure
        tasks_dir = os.path.join(out_dir, *TASKS_DIR)
        task_metrics = task_eval.evaluate_tasks(exp, generator, data_dir=data_dir, out_dir=tasks_dir,
                                                seed=exp.seed + 2)
        metrics.update(task_metrics)
        card = os.path.join(*TASKS_DIR, task_eval.CARD)
        sections["Task evaluation"] = (f"Goals from issue 15; samples and plots in [{card}]({card}).\n\n"
                                       + task_eval.card_markdown(task_metrics))
    if jax.process_index() == 0:
        _write_outputs(exp, out_dir, fake, real, captions, fps=spec.fps, metrics=metrics, scores=scores,
                       folder=folder, extra_sections=sections)
    logging.info("eval: %s", metrics)
    return metrics


def _write_outputs(exp: ExperimentConfig, out_dir: str, fake: np.ndarray, real: np.ndarray, captions: list[str], *,
                   fps: float, metrics: dict, scores: scoring.Scores, folder: str,
                   extra_sections: dict[str, str] | None = None) -> None:
    """Sample mp4/gif, generated and ground-truth grids, metrics.json and report.md (+ `extra_sections`) into
    `out_dir`."""
    n_show = min(exp.sample.num_samples, len(captions))
    samples = []
    for i in range(n_show):
        mp4, gif = os.path.join(out_dir, f"sample_{i:02d}.mp4"), os.path.join(out_dir, f"sample_{i:02d}.gif")
        media.write_mp4(mp4, fake[i], fps=fps, scale=4)
        media.write_gif(gif, fake[i], fps=fps, scale=4)
        samples.append({"caption": captions[i], "mp4": mp4, "gif": gif})
    grids = {}
    for name, videos in (("samples_grid.png", fake), ("real_grid.png", real)):
        grids[name] = os.path.join(out_dir, name)
        media.write_png_grid(grids[name], videos[:n_show], ncols=1, frames_per_row=min(9, videos.shape[1]), scale=3,
                             captions=captions[:n_show])
    write_text_atomic(os.path.join(out_dir, "metrics.json"),
                      json.dumps({"metrics": metrics, "protocols": scores.protocols, "timings": scores.timings,
                                  "skipped": scores.skipped, "generated": os.path.abspath(folder)}, indent=2))
    write_report(
        os.path.join(out_dir, "report.md"),
        title=f"klingjax report: {exp.name}",
        config_summary=_config_summary(exp),
        metrics=metrics,
        protocols=scores.protocols,
        samples=samples,
        grid_png=grids["samples_grid.png"],
        extra_sections={"Held-out ground truth": "![real clips](real_grid.png)",
                        "Generated videos": f"`{os.path.relpath(folder, out_dir)}` (score it with `klingjax-eval "
                                            f"--generated`)", **(extra_sections or {}),
                        **scorer_sections(scores.skipped, scores.timings)},
    )


def _config_summary(exp: ExperimentConfig) -> dict:
    return {
        "data": f"{exp.data.num_train} train / {exp.data.num_eval} eval clips, "
                f"{exp.data.num_frames}x{exp.data.height}x{exp.data.width}",
        "vae": f"{exp.vae.variant}, {exp.vae.steps} steps, batch {exp.vae.batch_size}",
        "dit": f"{exp.dit.variant}, {exp.dit.steps} steps, batch {exp.dit.batch_size}",
        "sampler": f"{exp.sample.sampler.value}, {exp.sample.num_steps} steps, cfg {exp.sample.cfg_scale}",
        "mesh": str(exp.mesh.sizes),
    }
