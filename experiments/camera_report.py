"""Side-by-side report of camera-control runs (experiments/camera.py): one table and one bar plot per metric.

    python experiments/camera_report.py --out workdirs/camera_report.md \\
        all_blocks=workdirs/camera_adapter first_blocks=workdirs/camera_first text=workdirs/camera_text

Reads each work dir's results.json (its eval) and writes the markdown table (with the goals of issue 17 and the
estimator's own error on the ground-truth clips and on the VAE's reconstructions) and `<out>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# metric -> (label, goal text, goal test)
GOALS = {
    "camera_direction_acc": ("camera-move direction accuracy", ">= 0.95", lambda v: v >= 0.95),
    "camera_move_acc": ("exact move set (no spurious moves)", "-", None),
    "camera_translation_err": ("translation error (px/frame)", "<= 0.15", lambda v: v <= 0.15),
    "camera_zoom_err": ("zoom-rate error (%/frame)", "<= 0.5", lambda v: v <= 0.5),
    "camera_roll_err": ("roll-rate error (deg/frame)", "-", None),
    "object_direction_acc_moving_camera": ("object direction, moving camera", "within 5 pts of static", None),
    "object_direction_acc_static_camera": ("object direction, static camera", "-", None),
    "adherence_colour_acc": ("colour adherence", "-", None),
    "adherence_direction_acc": ("direction adherence (pan-corrected)", "-", None),
}


def load(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["eval"]


def report(runs: dict[str, dict]) -> str:
    names = list(runs)
    lines = ["| metric | goal | " + " | ".join(names) + " | ground truth | VAE recon |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    first = runs[names[0]]
    for key, (label, goal, _) in GOALS.items():
        cells = [f"{runs[n].get(key, float('nan')):.3f}" for n in names]
        cells += [f"{first.get(key + tag, float('nan')):.3f}" for tag in ("_on_real", "_on_vae")]
        lines.append(f"| {label} | {goal} | " + " | ".join(cells) + " |")
    for n in names:
        r = runs[n]
        gap = r["object_direction_acc_static_camera"] - r["object_direction_acc_moving_camera"]
        verdicts = []
        for key, (label, goal, test) in GOALS.items():
            if test is not None:
                verdicts.append(f"{label} {r[key]:.3f} ({goal}) {'MET' if test(r[key]) else 'NOT MET'}")
        verdicts.append(f"object-direction gap {100 * gap:.1f} pts (<= 5) {'MET' if gap <= 0.05 else 'NOT MET'}")
        lines.append(f"\n`{n}`: " + "; ".join(verdicts))
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(GOALS)
    fig, axes = plt.subplots(3, 3, figsize=(12, 8))
    for ax, key in zip(axes.ravel(), keys):
        bars = ax.bar(list(runs), [runs[n].get(key, float("nan")) for n in runs],
                      color=["tab:blue", "tab:orange", "tab:gray", "tab:green"][: len(runs)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(GOALS[key][0], fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    args = p.parse_args(argv)
    runs = {n: load(w) for n, w in (r.split("=", 1) for r in args.runs)}
    text = report(runs)
    with open(args.out, "w") as f:
        f.write(f"# Camera control, side by side\n\n![metrics]({os.path.basename(args.out)}.png)\n\n{text}")
    plot(runs, args.out + ".png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
