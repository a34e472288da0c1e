"""`klingjax-plan`: predict step time, MFU and memory of a config on a pod before booking it.

    klingjax-plan --config experiments/t2v_recipe.py --target v5p-256 --config.dit.variant=14B \
        --config.data.num_frames=81 --config.data.height=480 --config.data.width=832 --config.text_max_len=512 \
        --batch_per_chip 1 --remat full
    klingjax-plan ... --target h100:64 --search --report /tmp/plan.md     # rank meshes x presets x remat
    klingjax-plan ... --target 8xh100 --mesh 1,4,1,2                       # one given mesh (data,fsdp,context,tensor)

Runs on CPU with fake devices (set here: JAX_PLATFORMS=cpu, 128 host devices): the train step is compiled on a
small mesh with the target's per-device shard shapes and costed with the chip table (klingjax/plan/roofline.py
says how, and what is assumed). TPU names count TensorCores (v5p-256 = 128 chips); compute is bf16 unless
--compute_dtype says otherwise. `--report` writes markdown and a PNG plot (step time and memory per mesh).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:arg].", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "Chips: v5p-256, v6e-64, h100:64, 8xh200, ... (see chips.py); "
                              "several, comma-separated, share their compiles.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,context,tensor (one may be -1); default: the config's mesh.")
_BATCH = flags.DEFINE_integer("batch_per_chip", None, "Global batch = this x chips (default: the config's).")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "dots_saveable", "full"],
                           "Remat policy (default: the config's; --search tries all three unless this is set).")
_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "Matmul compute dtype ('config' keeps the config's).")
_SEARCH = flags.DEFINE_bool("search", False, "Search meshes x presets x remat policies; rank those that fit.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 8, "Search: compile at most this many candidates.")
_REPORT = flags.DEFINE_string("report", None, "Write a markdown report (+ a .png plot beside it) here.")

FAKE_DEVICES = 128


def configure(exp, num_chips: int, batch_per_chip: int | None, remat: str | None, dtype: str | None):
    """The experiment with the plan's overrides: global batch, remat policy, compute dtype."""
    overrides = dict(exp.dit.model_overrides)
    if remat:
        overrides["remat"] = remat
    if dtype and dtype != "config":
        overrides["dtype"] = dtype
    batch = exp.dit.batch_size if batch_per_chip is None else batch_per_chip * num_chips
    return dataclasses.replace(exp, dit=dataclasses.replace(exp.dit, batch_size=batch, model_overrides=overrides))


def plan_table(plans, rejected=()) -> str:
    """Markdown table: one row per plan (fastest first), then the rejected candidates."""
    from klingjax.train.dry_run import fmt_bytes

    lines = ["| mesh (data,fsdp,context,tensor) | preset | remat | step (s) | MFU | tokens/s | peak/device | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {','.join(map(str, p.mesh.values()))} | {p.preset} | {p.remat} | {p.step_s:.4g} | "
                     f"{100 * p.mfu:.1f}% | {p.tokens_per_s:,.0f} | {fmt_bytes(p.peak_flash)} | "
                     f"{'yes' if p.fits else 'no'} |")
    lines += [f"| {name} | | | | | | | no: {why} |" for name, why in rejected]
    return "\n".join(lines)


def plot(plans, hbm_bytes: float, path: pathlib.Path) -> None:
    """Bar charts of predicted step time and peak memory per candidate, the chip's HBM as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{','.join(map(str, p.mesh.values()))}\n{p.preset}/{p.remat}" for p in plans]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(plans) + 4), 4.5))
    a.bar(labels, [p.step_s for p in plans], color="tab:blue")
    a.set_ylabel("predicted step time (s)")
    b.bar(labels, [p.peak_flash / 2**30 for p in plans], color=["tab:green" if p.fits else "tab:red" for p in plans])
    b.axhline(hbm_bytes / 2**30, color="k", linestyle="--", label="HBM per chip")
    b.set_ylabel("peak memory per device (GiB)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(path: str, sections) -> None:
    """Markdown (per target: table, plot, each plan's cost table) and one PNG plot per target beside it."""
    from klingjax.plan.roofline import format_plan

    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = []
    for i, (title, plans, rejected, chip) in enumerate(sections):
        png = out.with_name(f"{out.stem}_{i}.png")
        body += [f"## {title}", "", plan_table(plans, rejected), ""]
        if plans:
            plot(plans, chip.hbm_bytes, png)
            body += [f"![predicted step time and memory per mesh]({png.name})", ""]
        for p in plans:
            head, costs = format_plan(p).split("\n| cost", 1)
            body += ["```", head, "```", "", "| cost" + costs, ""]
    out.write_text("\n".join(body))


def predict_runs(experiments: dict, target: str) -> str:
    """A markdown table predicting each named experiment on `target` (its own mesh; the sweep's `--plan`)."""
    import jax

    from klingjax.plan import chips, roofline
    from klingjax.train.dry_run import fmt_bytes

    chip, n = chips.parse_target(target)
    cache: dict = {}
    lines = [f"predicted on {target} ({n} x {chip.name}); klingjax/plan/roofline.py states the assumptions",
             "| run | mesh | step (s) | MFU | tokens/s | peak/device | fits |", "|---|---|---|---|---|---|---|"]
    for name, exp in experiments.items():
        try:
            p = roofline.estimate(exp, chip, n, roofline.mesh_sizes(exp, n), jax.devices(), cache)
        except ValueError as e:
            lines.append(f"| {name} | | | | | | not planned: {e} |")
            continue
        lines.append(f"| {name} | {','.join(map(str, p.mesh.values()))} | {p.step_s:.4g} | {100 * p.mfu:.1f}% | "
                     f"{p.tokens_per_s:,.0f} | {fmt_bytes(p.peak_flash)} | {'yes' if p.fits else 'no'} |")
    return "\n".join(lines)


def fake_devices() -> None:
    """Ask XLA:CPU for FAKE_DEVICES host devices (before JAX's backend starts) for the abstract compiles."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={FAKE_DEVICES}").strip()


def plan_target(exp, target: str, devices, cache: dict) -> tuple[str, list, list, object]:
    """(title, plans, rejected, chip) of one target: the given mesh, or a search when --search."""
    from klingjax.plan import chips, roofline, search

    chip, n = chips.parse_target(target)
    exp = configure(exp, n, _BATCH.value, _REMAT.value, _DTYPE.value)
    title = (f"klingjax-plan: DiT {exp.dit.variant}, {exp.data.num_frames}x{exp.data.height}x{exp.data.width}, "
             f"{target} ({n} x {chip.name}), batch {exp.dit.batch_size}")
    if _SEARCH.value:
        remats = (_REMAT.value,) if _REMAT.value else search.REMATS  # --remat pins the policy
        plans, rejected = search.search(exp, chip, n, devices, remats=remats, max_compiles=_MAX_COMPILES.value,
                                        cache=cache)
        return title, plans, rejected, chip
    if _MESH.value:
        sizes = dict(zip(("data", "fsdp", "context", "tensor"), (int(s) for s in _MESH.value.split(","))))
        exp = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, **sizes))
    return title, [roofline.estimate(exp, chip, n, roofline.mesh_sizes(exp, n), devices, cache)], [], chip


def main(argv) -> None:
    del argv
    import jax

    from klingjax.config import ConfigError, to_experiment
    from klingjax.plan import roofline

    cache: dict = {}  # targets with the same per-device shards share one compile
    sections = []
    for target in _TARGET.value.split(","):
        try:
            title, plans, rejected, chip = plan_target(to_experiment(_CONFIG.value), target, jax.devices(), cache)
        except (ConfigError, ValueError) as e:
            raise app.UsageError(str(e)) from e
        print(title, flush=True)
        if _SEARCH.value:
            print(plan_table(plans, rejected), flush=True)
        if plans:
            print(("best:\n" if _SEARCH.value else "") + roofline.format_plan(plans[0]) + "\n", flush=True)
        sections.append((title, plans, rejected, chip))
    if _REPORT.value:
        write_report(_REPORT.value, sections)
        print(f"report: {_REPORT.value} (+ a .png per target beside it)")


def run() -> None:
    """Console-script entry point: fake CPU devices for the abstract compiles, then `main`."""
    fake_devices()
    flags.mark_flags_as_required(["config", "target"])
    app.run(main)


if __name__ == "__main__":
    run()
