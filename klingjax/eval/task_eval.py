"""Per-task evaluation of a masked-video model: condition held-out clips as generation would, generate, score.

For each task of the model's mixture (`exp.dit.tasks`), the held-out clips give the ground truth and the condition
(deterministic masks: i2v; first+last frame; extension = the first latent frame (token) given, backwards the last;
keyframes = first, middle and last latent frames (first and last on 3); inpaint = everything outside the
token-aligned box around the main sprite's whole trajectory given, with that sprite's colour and shape changed in the
prompt; outpaint = the central half given).
The metrics (`klingjax.eval.task_metrics`) go to `task_card.md` (value, the issue's goal, MET / NOT MET),
`task_metrics.json`, `task_metrics.png` and one `grid_<task>.png` per task (condition | generated | ground truth).
Ceilings are the same metric on the "oracle": the VAE decoding of the given latents completed with the real clip's
latents, i.e. a generator that is right everywhere it is free to be.

    klingjax-eval --checkpoint WORKDIR --dataset WORKDIR/data --out OUT --tasks [i2v,inpaint]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from klingjax import layout
from klingjax.config import ExperimentConfig
from klingjax.data import tasks as task_table
from klingjax.data.synthetic import SyntheticSpec, sprite_height
from klingjax.data.tasks import SOURCE_FRAMES, TASKS, Box, Grid, given_latents
from klingjax.eval import heldout, media
from klingjax.eval import task_metrics as tm
from klingjax.eval.report import plot_metrics, write_text_atomic

CARD, METRICS_JSON, PLOT = "task_card.md", "task_metrics.json", "task_metrics.png"
# Card / metric prefix of each task of the table (extension forwards is the "prefix" task).
CARD_NAMES = {"t2v": "t2v", "i2v": "i2v", "flf2v": "flf2v", "keyframes": "keyframes", "prefix": "extension",
              "suffix": "extension_backward", "inpaint": "inpaint", "outpaint": "outpaint"}
# The acceptance goals: metric -> (comparison, threshold, as written on the card). Accuracies are fractions.
GOALS: dict[str, tuple[str, float, str]] = {
    "i2v/first_frame_psnr_gap": ("<=", 1.0, "<= 1 dB below reconstruction"),
    "i2v/colour_shape_acc": (">=", 0.95, ">= 95%"),
    "i2v/direction_acc": (">=", 0.90, ">= 90%"),
    "flf2v/key_frame_psnr_gap": ("<=", 1.5, "<= 1.5 dB below reconstruction"),
    "extension/speed_err_px": ("<=", 0.3, "<= 0.3 px/frame"),
    "extension/seam_flicker_ratio": ("<=", 1.2, "<= 1.2x in-clip"),
    "inpaint/outside_psnr_gap": ("<=", 0.5, "<= 0.5 dB below reconstruction"),
    "inpaint/inside_acc": (">=", 0.85, ">= 85%"),
}
_EMPTY = 128  # grey of the positions a condition leaves to the generator, in the sample grids


@dataclasses.dataclass(frozen=True)
class Condition:
    """What one task hands the generator for N clips, and what the generated clips should then show."""

    captions: list[str]
    metas: list[dict]  # the target: the clips' metadata (inpaint: with the replaced sprite's colour and shape)
    mask: np.ndarray | None  # (N, t, h, w) bool, True = given; None: text-to-video


# ---------------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------------


def mixture_tasks(exp: ExperimentConfig) -> list[str]:
    """The tasks with a positive weight in the experiment's mixture (`exp.dit.tasks`), in table order."""
    weights = getattr(exp.dit, "tasks", None) or {}
    return [name for name in TASKS if weights.get(name, 0) > 0]


def _latent_mask(tokens_mask: np.ndarray, patch: Grid) -> np.ndarray:
    """A token-grid mask (T, H, W) repeated over each patch -> (t, h, w), as `tasks.draw_task` does."""
    for axis, p in enumerate(patch):
        tokens_mask = tokens_mask.repeat(p, axis=axis)
    return tokens_mask


def trajectory_box(obj: dict, num_frames: int, spatial_factor: int, grid: Grid, patch: Grid) -> Box:
    """Latent-grid box (top, bottom, left, right), whole tokens, covering a sprite's bbox (+1 px of soft edge) in
    every frame of its true trajectory (`meta["objects"][i]`)."""
    top_left = np.asarray(obj["start"]) + np.arange(num_frames)[:, None] * np.asarray(obj["screen_velocity"])  # (T, 2)
    extent = np.array([sprite_height(obj["shape"], obj["size"]), obj["size"]])  # (h, w) px
    px_per_token = spatial_factor * np.asarray(patch[1:])  # (y, x)
    lo = np.floor((top_left.min(0) - 1.0) / px_per_token).astype(int) * patch[1:]
    hi = np.ceil((top_left.max(0) + extent + 1.0) / px_per_token).astype(int) * patch[1:]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, grid[1:])
    return int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1])


def keyframe_indices(t: int) -> list[int]:
    """The keyframes task's given latent (token) frames: first, middle and last, or first and last where those three
    would leave nothing to generate (t <= 3)."""
    frames = sorted({0, t // 2, t - 1})
    return frames if len(frames) < t else sorted({0, t - 1})


def central_box(tokens: Grid) -> Box:
    """The central half (per side, at least one token) of a token grid, in tokens."""
    out = []
    for side in tokens[1:]:
        size = max(1, round(side / 2))
        out += [(side - size) // 2, (side - size) // 2 + size]
    return out[0], out[1], out[2], out[3]


def recolour(caption: str, meta: dict, spec: SyntheticSpec, rng: np.random.Generator) -> tuple[str, dict]:
    """(prompt, target meta) with the main sprite's colour and shape changed: a colour of the spec no object of the
    clip has, another shape; the rest of the caption (direction, background, camera) is kept."""
    obj = meta["objects"][0]
    colour = str(rng.choice([c for c, _ in spec.colours if c not in {o["colour"] for o in meta["objects"]}]))
    shape = str(rng.choice([s for s in spec.shapes if s != obj["shape"]]))
    prompt, n = re.subn(rf"\b{obj['colour']} {obj['shape']}\b", f"{colour} {shape}", caption, count=1)
    if n != 1:
        raise ValueError(f"caption {caption!r} does not name its object '{obj['colour']} {obj['shape']}'")
    return prompt, {**meta, "objects": [{**obj, "colour": colour, "shape": shape}, *meta["objects"][1:]]}


def build_condition(task: str, captions: Sequence[str], metas: Sequence[dict], spec: SyntheticSpec, grid: Grid,
                    patch: Grid, spatial_factor: int, seed: int = 0) -> Condition:
    """The deterministic condition of `task` for each clip on the latent grid (t, h, w) (masks drawn on tokens)."""
    tokens = tuple(g // p for g, p in zip(grid, patch))
    fixed = {  # one mask for every clip, on the token grid
        "t2v": None, "i2v": task_table.i2v(tokens), "flf2v": task_table.flf2v(tokens),
        "prefix": task_table.prefix(tokens, 1), "suffix": task_table.suffix(tokens, 1),
        "keyframes": task_table.keyframes(tokens, keyframe_indices(tokens[0])),
        "outpaint": task_table.outpaint(tokens, central_box(tokens)),
    }
    captions, metas = list(captions), list(metas)
    if task == "inpaint":
        pairs, masks = [], []
        for i, (caption, meta) in enumerate(zip(captions, metas)):
            pairs.append(recolour(caption, meta, spec, np.random.default_rng([seed, i])))
            top, bottom, left, right = trajectory_box(meta["objects"][0], spec.num_frames, spatial_factor, grid, patch)
            box = (top // patch[1], bottom // patch[1], left // patch[2], right // patch[2])  # in tokens
            masks.append(_latent_mask(task_table.box_inpaint(tokens, box), patch))
        return Condition([p for p, _ in pairs], [m for _, m in pairs], np.stack(masks))
    if task not in fixed:
        raise ValueError(f"no evaluation for task {task!r}; known: {sorted(fixed) + ['inpaint']}")
    mask = fixed[task]
    if mask is None:
        return Condition(captions, metas, None)
    return Condition(captions, metas, np.broadcast_to(_latent_mask(mask, patch), (len(captions), *grid)).copy())


# ---------------------------------------------------------------------------------------------------
# Per-task metrics
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One task's generated clips next to what they are judged against; videos uint8 (N, T, H, W, 3)."""

    fake: np.ndarray
    real: np.ndarray
    oracle: np.ndarray  # the VAE decoding of the given latents completed with the real clip's: the ceiling
    cond: Condition
    given_px: np.ndarray  # (N, T, H, W) bool: the pixels the condition fixes
    spec: SyntheticSpec


def _psnr_triplet(name: str, fake: np.ndarray, ceiling: np.ndarray) -> dict[str, float]:
    """name, name_ceiling and name_gap (= ceiling - generated, dB) from per-clip PSNRs."""
    value, top = float(np.nanmean(fake)), float(np.nanmean(ceiling))
    return {name: value, f"{name}_ceiling": top, f"{name}_gap": top - value}


def _t2v(o: Outcome) -> dict[str, float]:
    return {f"{k}_acc": v for k, v in tm.adherence(o.fake, o.cond.metas, o.spec).items() if k != "colour_shape"}


def _i2v(o: Outcome) -> dict[str, float]:
    acc = tm.adherence(o.fake, o.cond.metas, o.spec)
    return {**_psnr_triplet("first_frame_psnr", tm.frame_psnr(o.fake, o.real, [0]),
                            tm.frame_psnr(o.oracle, o.real, [0])),
            "colour_shape_acc": acc["colour_shape"], "direction_acc": acc["direction"]}


def _key_frames(o: Outcome) -> dict[str, float]:
    frames = list(np.flatnonzero(o.given_px[0].all((1, 2))))
    return {**_psnr_triplet("key_frame_psnr", tm.frame_psnr(o.fake, o.real, frames),
                            tm.frame_psnr(o.oracle, o.real, frames)),
            "centroid_err_px": tm.centroid_error(o.fake, o.cond.metas, o.spec, frames),
            "centroid_err_px_on_real": tm.centroid_error(o.real, o.cond.metas, o.spec, frames)}


def _extension(o: Outcome) -> dict[str, float]:
    given = o.given_px[0].all((1, 2))  # (T,) the given pixel frames
    new = list(np.flatnonzero(~given))
    seam = int(np.flatnonzero(given[1:] != given[:-1])[0]) + 1  # the first frame past the given / new boundary
    acc = tm.adherence(o.fake[:, new], o.cond.metas, o.spec)
    return {"speed_err_px": tm.speed_error(o.fake, o.cond.metas, o.spec, new),
            "speed_err_px_on_real": tm.speed_error(o.real, o.cond.metas, o.spec, new),
            "direction_acc": acc["direction"], "colour_acc": acc["colour"], "shape_acc": acc["shape"],
            "seam_flicker_ratio": float(np.mean(tm.seam_flicker(o.fake, seam, new))),
            "seam_flicker_ratio_on_real": float(np.mean(tm.seam_flicker(o.real, seam, new)))}


def _painting(region: str) -> Callable[[Outcome], dict[str, float]]:
    """In/outpainting: PSNR of the given `region` ("outside" / "inside" the box), its ceiling, the seam."""

    def metrics(o: Outcome) -> dict[str, float]:
        return {**_psnr_triplet(f"{region}_psnr", tm.masked_psnr(o.fake, o.real, o.given_px),
                                tm.masked_psnr(o.oracle, o.real, o.given_px)),
                "seam_ratio": float(np.nanmean(tm.seam_ratio(o.fake, o.given_px))),
                "seam_ratio_on_real": float(np.nanmean(tm.seam_ratio(o.real, o.given_px)))}

    return metrics


def _inpaint(o: Outcome) -> dict[str, float]:
    replaced = [{**m, "objects": m["objects"][:1]} for m in o.cond.metas]  # the sprite the prompt changed
    return {**_painting("outside")(o), "inside_acc": tm.adherence(o.fake, replaced, o.spec)["colour_shape"]}


def _outpaint(o: Outcome) -> dict[str, float]:
    acc = tm.adherence(o.fake, o.cond.metas, o.spec)
    return {**_painting("inside")(o), **{f"{k}_acc": acc[k] for k in ("colour", "shape", "direction", "all")}}


def _judged(metric: str) -> bool:
    """A detector-based metric (adherence, speed, centroid error), not a PSNR or a reference value."""
    # Inpainting's inside_acc has no VAE ceiling: the oracle keeps the source's sprite, not the prompt's.
    judged = metric.endswith("_acc") or metric in ("speed_err_px", "centroid_err_px")
    return judged and "_on_" not in metric and metric != "inside_acc"


TASK_METRICS: dict[str, Callable[[Outcome], dict[str, float]]] = {
    "t2v": _t2v, "i2v": _i2v, "flf2v": _key_frames, "keyframes": _key_frames, "prefix": _extension,
    "suffix": _extension, "inpaint": _inpaint, "outpaint": _outpaint,
}


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def evaluate_tasks(exp: ExperimentConfig, generator, *, data_dir: str, out_dir: str, tasks: Sequence[str] | None = None,
                   num_clips: int | None = None, seed: int = 0) -> dict[str, float]:
    """Condition, generate and score each task on held-out clips; writes the card, JSON, plot and grids into
    `out_dir` (host 0) and returns flat metrics `<task>/<metric>`.

    generator: a `VideoGenerator` (`__call__(captions, key, batch_size=, given=, given_mask=)`, `encode`,
    `encode_frames`, `decode`). tasks: default the experiment's mixture. num_clips: default `exp.eval.num_clips`.
    """
    names = list(tasks) if tasks else mixture_tasks(exp)
    if unknown := sorted(set(names) - set(TASK_METRICS)):
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASK_METRICS)}")
    spec = heldout.synthetic_spec(data_dir)
    real, captions, metas = heldout.load_eval_clips(exp, data_dir, num_clips or exp.eval.num_clips)
    patch = tuple(layout.dit_model_config(exp, 1).patch_size)
    clip_lat = frame_lat = None
    bs = exp.eval.batch_size
    if set(names) - {"t2v"}:
        clip_lat = np.asarray(generator.encode(real, batch_size=bs))  # (N, t, h, w, C)
        needs_frames = any(TASKS[n].source == SOURCE_FRAMES for n in names)
        frame_lat = np.asarray(generator.encode_frames(real, batch_size=bs)) if needs_frames else clip_lat
    grid = clip_lat.shape[1:4] if clip_lat is not None else tuple(layout.latent_grid(exp)[:3])
    temporal_factor = (real.shape[1] - 1) // max(grid[0] - 1, 1)
    spatial_factor = real.shape[2] // grid[1]
    tokens = tuple(g // p for g, p in zip(grid, patch))
    fits = [n for n in names if tokens[0] >= TASKS[n].min_frames and min(tokens[1:]) >= TASKS[n].min_side]
    if skipped := sorted(set(names) - set(fits)):
        logging.warning("task eval: %s generate nothing on the token grid %s; skipped", skipped, tokens)
    metrics, shown = {}, {}
    for i, name in enumerate(fits):
        cond = build_condition(name, captions, metas, spec, grid, patch, spatial_factor, seed)
        key = jax.random.fold_in(jax.random.key(seed), i)
        logging.info("task eval: %s on %d clips", name, len(captions))
        if cond.mask is None:
            fake = generator(cond.captions, key, batch_size=bs)
            oracle = real if clip_lat is None else np.asarray(generator.decode(clip_lat, batch_size=bs))
            given_px = np.zeros(real.shape[:4], bool)
        else:
            given = given_latents(name, clip_lat, frame_lat)
            fake = generator(cond.captions, key, batch_size=bs, given=given, given_mask=cond.mask)
            oracle = np.asarray(generator.decode(np.where(cond.mask[..., None], given, clip_lat), batch_size=bs))
            given_px = tm.pixel_mask(cond.mask, real.shape[1], temporal_factor, spatial_factor,
                                     key_frames_only=TASKS[name].source == SOURCE_FRAMES)
        fake = np.asarray(fake)
        outcome = Outcome(fake=fake, real=real, oracle=oracle, cond=cond, given_px=given_px, spec=spec)
        metrics.update({f"{CARD_NAMES[name]}/{k}": float(v) for k, v in TASK_METRICS[name](outcome).items()})
        # The same judgements of the VAE's own output (the ceiling of any DiT): the detector-based metrics of the
        # oracle clips, so the card separates the VAE's error from the DiT's.
        on_vae = TASK_METRICS[name](dataclasses.replace(outcome, fake=oracle))
        metrics.update({f"{CARD_NAMES[name]}/{k}_on_vae": float(v) for k, v in on_vae.items() if _judged(k)})
        shown[name] = outcome
    if jax.process_index() == 0:
        _write_outputs(out_dir, metrics, shown, captions)
    logging.info("task eval: %s", metrics)
    return metrics


def goal_status(name: str, value: float) -> str:
    """"MET" / "NOT MET" for a metric with a goal in `GOALS` (NaN never meets one), "" for one without."""
    if name not in GOALS:
        return ""
    op, threshold, _ = GOALS[name]
    met = np.isfinite(value) and (value <= threshold if op == "<=" else value >= threshold)
    return "MET" if met else "NOT MET"


def card_markdown(metrics: dict[str, float]) -> str:
    """The markdown table of the card: task, metric, value, goal, MET / NOT MET (blank: no goal in the issue)."""
    lines = ["| task | metric | value | goal | status |", "|---|---|---|---|---|"]
    for name, value in metrics.items():
        task, metric = name.split("/", 1)
        goal = GOALS[name][2] if name in GOALS else ""
        lines.append(f"| {task} | {metric} | {value:.4g} | {goal} | {goal_status(name, value)} |")
    return "\n".join(lines) + "\n"


def _write_outputs(out_dir: str, metrics: dict[str, float], shown: dict[str, Outcome], captions: list[str]) -> None:
    """task_card.md, task_metrics.json, task_metrics.png and one grid_<task>.png per task into `out_dir`."""

    os.makedirs(out_dir, exist_ok=True)
    grids = []
    for name, o in shown.items():
        n = min(2, len(o.fake))
        condition = np.where(o.given_px[:n, ..., None], o.real[:n], np.uint8(_EMPTY))  # (n, T, H, W, 3)
        rows = np.stack([condition, o.fake[:n], o.real[:n]], 1).reshape(3 * n, *o.fake.shape[1:])  # (3n, T, H, W, 3)
        labels = [x for i in range(n) for x in ("condition", f"generated: {o.cond.captions[i]}",
                                                f"ground truth: {captions[i]}")]
        grids.append(f"grid_{CARD_NAMES[name]}.png")
        media.write_png_grid(os.path.join(out_dir, grids[-1]), rows, ncols=1,
                             frames_per_row=min(9, o.fake.shape[1]), scale=3, captions=labels)
    plot_metrics(os.path.join(out_dir, PLOT), metrics)
    write_text_atomic(os.path.join(out_dir, METRICS_JSON), json.dumps(
        {"metrics": metrics, "num_clips": len(captions), "tasks": list(shown),
         "goals": {k: {"goal": GOALS[k][2], "status": goal_status(k, v)} for k, v in metrics.items() if k in GOALS}},
        indent=2))
    body = "\n".join(f"![{g}]({g})" for g in grids)
    write_text_atomic(os.path.join(out_dir, CARD),
                      f"# Task card ({len(captions)} held-out clips)\n\n{card_markdown(metrics)}\n"
                      f"![metrics]({PLOT})\n\nSamples (condition | generated | ground truth):\n\n{body}\n")
