"""Sweep report: one markdown table of every run's final metrics, plus loss curves and metric-vs-setting plots.

    python -m launch.report workdirs/sweeps/ablation_tsampling_x_weighting_runlocal

Reads `<sweep dir>/sweep.json` (written by launch.sweep) and each run's work directory (`results.json`,
`*_metrics.jsonl`, `DONE.json`); writes `report.md`, `loss_curves.png` and `metrics_vs_<key>.png` into the
sweep directory. Runs that have not finished are listed with their status and left out of the plots.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klingjax.eval.report import read_jsonl

TRAIN_STAGES = ("vae", "dit")
# Headline evaluation metrics, plotted against the swept values when present (lower/higher is better).
PLOT_METRICS = {"fvd": "lower", "adherence_all_acc": "higher", "adherence_colour_acc": "higher",
                "adherence_shape_acc": "higher", "adherence_direction_acc": "higher"}


def _load_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def loss_curve(workdir: str, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of a stage, keeping the last record of each step (a resumed run re-logs steps)."""
    path = os.path.join(workdir, f"{stage}_metrics.jsonl")
    per_step = {r["step"]: r["loss"] for r in (read_jsonl(path) if os.path.exists(path) else []) if "loss" in r}
    steps = np.asarray(sorted(per_step), np.int64)
    return steps, np.asarray([per_step[s] for s in steps], np.float64)


def collect(sweep_dir: str) -> tuple[dict, list[dict[str, Any]]]:
    """(sweep record, one row per run: name, swept values, status, final losses, eval metrics)."""
    sweep = _load_json(os.path.join(sweep_dir, "sweep.json"))
    if not sweep:
        raise FileNotFoundError(f"{sweep_dir}/sweep.json is missing: is this a launch.sweep directory?")
    rows = []
    for run in sweep["runs"]:
        wd = run["workdir"]
        results = _load_json(os.path.join(wd, "results.json"))
        done = os.path.exists(os.path.join(wd, "DONE.json"))
        status = "done" if done else ("started" if os.path.isdir(wd) else "not started")
        losses = {}
        for stage in TRAIN_STAGES:
            steps, loss = loss_curve(wd, stage)
            if steps.size:
                losses[f"{stage}_final_loss"] = float(loss[-1])
                losses[f"{stage}_steps"] = int(steps[-1])
        metrics = {k: v for k, v in results.get("eval", {}).items() if isinstance(v, (int, float))}
        rows.append({"name": run["name"], "workdir": wd, "swept": run["swept"], "status": status, **losses,
                     "eval": metrics})
    return sweep, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], swept_keys: Sequence[str]) -> str:
    """Runs as rows; swept values, status, final losses and every eval metric (ground-truth ceilings apart)."""
    loss_cols = [c for c in (f"{s}_final_loss" for s in TRAIN_STAGES) if any(c in r for r in rows)]
    metric_cols = sorted({k for r in rows for k in r["eval"] if not k.endswith("_on_real")})
    header = ["run", *swept_keys, "status", *loss_cols, *metric_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], *(r["swept"].get(k, "") for k in swept_keys), r["status"],
                 *(r.get(c, "") for c in loss_cols), *(r["eval"].get(c, "") for c in metric_cols)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(rows: Sequence[Mapping[str, Any]], path: str) -> str | None:
    """One panel per training stage, one line per run."""
    stages = [s for s in TRAIN_STAGES if any(loss_curve(r["workdir"], s)[0].size for r in rows)]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for r in rows:
            steps, loss = loss_curve(r["workdir"], stage)
            if steps.size:
                ax.plot(steps, loss, marker="." if steps.size < 30 else None, label=r["name"])
        ax.set(title=f"{stage} training loss", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics_vs(rows: Sequence[Mapping[str, Any]], key: str, other_keys: Sequence[str], path: str) -> str | None:
    """Each headline metric against the values of `key`; one line per setting of the other swept keys."""
    metrics = [m for m in PLOT_METRICS if any(m in r["eval"] for r in rows)]
    if not metrics:
        return None
    values = list(dict.fromkeys(_fmt(r["swept"].get(key)) for r in rows))  # categorical x, sweep order
    groups: dict[str, list] = {}
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={_fmt(r['swept'].get(k))}" for k in other_keys) or "runs"
        groups.setdefault(label, []).append(r)
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, group in groups.items():
            pts = sorted((values.index(_fmt(r["swept"].get(key))), r["eval"][metric]) for r in group
                         if metric in r["eval"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xticks(range(len(values)), values)
        ax.set(title=f"{metric} ({PLOT_METRICS[metric]} is better)", xlabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(sweep_dir: str) -> str:
    """Write report.md and the PNGs into `sweep_dir`; returns the report path."""
    sweep, rows = collect(sweep_dir)
    keys = sweep.get("swept_keys") or list(dict.fromkeys(k for r in rows for k in r["swept"]))
    finished = [r for r in rows if r["status"] == "done"]
    images = []
    if p := plot_loss_curves(finished, os.path.join(sweep_dir, "loss_curves.png")):
        images.append(("Training loss", p))
    for key in keys:
        safe = key.replace(".", "_")
        if p := plot_metrics_vs(finished, key, [k for k in keys if k != key],
                                os.path.join(sweep_dir, f"metrics_vs_{safe}.png")):
            images.append((f"Evaluation metrics vs `{key}`", p))

    lines = [f"# Sweep report: {sweep['name']}", "",
             f"Base config `{sweep.get('base', '')}`; swept: {', '.join(f'`{k}`' for k in keys) or 'nothing'}; "
             f"{len(finished)}/{len(rows)} runs finished.", "", "## Final metrics", "",
             markdown_table(rows, keys), ""]
    ceilings = {k: v for r in rows for k, v in r["eval"].items() if k.endswith("_on_real")}
    if ceilings:
        lines += ["Adherence detector on the real held-out clips (the ceiling): "
                  + ", ".join(f"{k[: -len('_on_real')]} {_fmt(v)}" for k, v in sorted(ceilings.items())), ""]
    for title, p in images:
        lines += [f"## {title}", "", f"![{title}]({os.path.basename(p)})", ""]
    lines += ["## Runs", ""] + [f"- `{r['name']}`: `{r['workdir']}`" for r in rows] + [""]
    path = os.path.join(sweep_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        sys.stderr.write("usage: python -m launch.report <sweep dir>\n")
        return 2
    sys.stdout.write(write_report(argv[0]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
