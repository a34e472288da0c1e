"""Ablation sweeps: expand a sweep file into named runs, then run them one after another (or print them).

    python -m launch.sweep experiments/ablation_sweep.py:runlocal                 # run locally, then report
    python -m launch.sweep experiments/ablation_sweep.py:runlocal --dry_run       # print the commands only
    python -m launch.sweep experiments/ablation_sweep.py --launcher=slurm         # print sbatch lines

A sweep file sits next to its base config and defines `get_sweep(arg) -> Sweep`:

    def get_sweep(arg=None):
        return Sweep(name="ablation", base="ablation.py:runlocal",
                     runs=product({"dit.timestep_sampling": ["logit_normal", "uniform"]},
                                  zipped({"dit.model_overrides.dim": [32, 64],
                                          "dit.model_overrides.ffn_dim": [64, 128]})))

Every run gets a stable name from its swept values (`timestep_sampling=uniform,dim=64`) and the work directory
`<workdir_root>/<sweep name>/<run name>`. Everything is validated before anything starts: every override key
must exist in the base config, values must pass `to_experiment`, and run names must be unique. A run that
finished writes `DONE.json` into its work directory, and is skipped next time; an interrupted run has no
marker and is started again, and the train loop resumes it from its latest checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from klingjax.config import ConfigError, to_experiment

DONE_MARKER = "DONE.json"
SWEEP_JSON = "sweep.json"
TRAIN_ENTRY = ("klingjax-train",)  # what cluster commands run
LAUNCHERS = {
    "local": (),
    "tpu_pod": ("launch/tpu_pod.sh", "--tpu=${TPU_NAME}", "--zone=${ZONE}", "--"),
    "slurm": ("sbatch", "launch/slurm_gpu.sbatch"),
}


class SweepError(ValueError):
    """A sweep definition is invalid (caught before any run starts)."""


# ---------------------------------------------------------------------------------------------------------
# Sweep definitions
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config and the overrides of each run (build `runs` with `product` / `zipped`)."""

    name: str
    base: str  # config file relative to the sweep file, optionally ":arg"
    runs: Sequence[Mapping[str, Any]]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every run gets these
    share_data: bool = True  # one dataset, <sweep dir>/data, for all runs (unless a data.* key is swept)


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Runs that vary several keys together: {"a": [1, 2], "b": [3, 4]} -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zipped axes have different lengths: {lengths}")
    return [dict(zip(axes, values)) for values in zip(*axes.values())]


def product(*axes: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Cartesian product; each axis is {key: values} (itself a product, first key slowest) or a list of runs."""
    lists: list[list[dict[str, Any]]] = []
    for axis in axes:
        if isinstance(axis, Mapping):
            lists.extend([{k: v} for v in values] for k, values in axis.items())
        else:
            lists.append([dict(run) for run in axis])
    out = []
    for combo in itertools.product(*lists):
        run: dict[str, Any] = {}
        for part in combo:
            if clash := set(run) & set(part):
                raise SweepError(f"product: key(s) {sorted(clash)} appear in more than one axis")
            run.update(part)
        out.append(run)
    return out


# ---------------------------------------------------------------------------------------------------------
# Expansion: names, work dirs, validation
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One expanded run: its name, swept values, all overrides, work directory and command."""

    name: str
    swept: dict[str, Any]
    overrides: dict[str, Any]
    workdir: str
    config: str  # "path[:arg]" as passed to --config

    def argv(self, entry: Sequence[str]) -> list[str]:
        """The train command: `entry --config ... --workdir ... --config.key=value ...`."""
        flags = [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
        return [*entry, "--config", self.config, "--workdir", self.workdir, *flags]


def format_value(value: Any) -> str:
    """A value as config_flags parses it back (strings verbatim, tuples as Python literals)."""
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_short(v) for v in value)
    return str(value)


def run_name(swept: Mapping[str, Any]) -> str:
    """Stable, filesystem-safe name from the swept values; keys shortened to their last component if unique."""
    if not swept:
        return "base"
    last = [k.split(".")[-1] for k in swept]
    parts = [f"{k.split('.')[-1] if last.count(k.split('.')[-1]) == 1 else k}={_short(v)}" for k, v in swept.items()]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def _load_module(path: str, what: str):
    if not os.path.isfile(path):
        raise SweepError(f"{what} {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_{what}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_arg(path_arg: str) -> tuple[str, str | None]:
    path, _, arg = path_arg.partition(":")
    return path, (arg or None)


def load_sweep(path_arg: str) -> tuple[Sweep, str]:
    """(the Sweep of `file.py[:arg]`, the sweep file's absolute path)."""
    path, arg = _split_arg(path_arg)
    module = _load_module(os.path.abspath(path), "sweep")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"sweep file {path!r} defines no get_sweep(arg)")
    sweep = module.get_sweep(arg)
    if not isinstance(sweep, Sweep):
        raise SweepError(f"{path}: get_sweep returned {type(sweep).__name__}, not a launch.sweep.Sweep")
    return sweep, os.path.abspath(path)


def load_base_config(config_path_arg: str) -> ml_collections.ConfigDict:
    """The base ConfigDict of `path[:arg]` (what `--config path[:arg]` would load)."""
    path, arg = _split_arg(config_path_arg)
    return _load_module(path, "config").get_config(arg)


def _apply(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
    """Set a dotted key that must already exist (like config_flags with lock_config=True)."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise SweepError(f"{where}: override key '{key}' is not in the base config "
                             f"(no section '{'.'.join(parents[:i + 1])}')")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise SweepError(f"{where}: override key '{key}' is not in the base config (valid here: {valid})")
    try:
        node[leaf] = tuple(value) if isinstance(value, list) else value
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: override '{key}={value!r}' has the wrong type: {e}") from None


def _display_path(path: str) -> str:
    """Relative to the current directory when inside it (commands read better), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _join(root: str, name: str) -> str:
    """Work-directory paths: absolute locally; URLs (gs://...) kept as they are for cluster commands."""
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.abspath(os.path.join(root, name))


def expand(sweep: Sweep, sweep_file: str, workdir_root: str) -> list[Run]:
    """Validate the sweep and expand it into runs; raises SweepError before anything is launched."""
    base_path, base_arg = _split_arg(sweep.base)
    base_path = os.path.join(os.path.dirname(sweep_file), base_path)
    config_arg = _display_path(base_path) + (f":{base_arg}" if base_arg else "")
    if not sweep.runs:
        raise SweepError(f"sweep {sweep.name!r} has no runs")
    sweep_dir = _join(workdir_root, sweep.name)
    fixed = dict(sweep.fixed)
    swept_keys = {k for run in sweep.runs for k in run}
    if sweep.share_data and "data.path" not in fixed and not any(k.startswith("data.") for k in swept_keys):
        fixed["data.path"] = _join(sweep_dir, "data")

    runs, seen = [], {}
    for i, swept in enumerate(sweep.runs):
        name = run_name(swept)
        if name in seen:
            raise SweepError(f"duplicate run name {name!r}: runs {seen[name]} and {i} ({dict(swept)})")
        seen[name] = i
        overrides = {**fixed, **swept}
        config = load_base_config(base_path + (f":{base_arg}" if base_arg else ""))
        for key, value in overrides.items():
            _apply(config, key, value, f"run {name!r}")
        try:
            to_experiment(config)
        except ConfigError as e:
            raise SweepError(f"run {name!r}: {e}") from None
        runs.append(Run(name, dict(swept), overrides, _join(sweep_dir, name), config_arg))
    return runs


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def _marker_key(run: Run) -> dict[str, Any]:
    """What identifies a run's settings (the config path made absolute: the sweep may be rerun from elsewhere)."""
    path, sep, arg = run.config.partition(":")
    return {"config": os.path.abspath(path) + sep + arg,
            "overrides": {k: format_value(v) for k, v in run.overrides.items()}}


def is_finished(run: Run) -> bool:
    """True if the run's completion marker exists (it is written only after a successful, complete run)."""
    path = os.path.join(run.workdir, DONE_MARKER)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        done = json.load(f)
    if {k: done.get(k) for k in ("config", "overrides")} != _marker_key(run):
        raise SweepError(f"run {run.name!r} in {run.workdir} was finished with different settings; "
                         "remove that directory to rerun it")
    return True


def _completed(run: Run, started: float) -> bool:
    """The run's results.json is new and every training stage reached its last step."""
    path = os.path.join(run.workdir, "results.json")
    if not os.path.exists(path) or os.path.getmtime(path) < started:
        return False
    with open(path) as f:
        results = json.load(f)
    return all(r.get("finished", True) for r in results.values() if isinstance(r, dict))


def write_sweep_json(sweep: Sweep, sweep_file: str, runs: Sequence[Run], sweep_dir: str) -> str:
    """Record the expanded sweep (read by launch.report)."""
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, SWEEP_JSON)
    record = {
        "name": sweep.name, "sweep_file": sweep_file, "base": runs[0].config,
        "swept_keys": list(dict.fromkeys(k for r in runs for k in r.swept)),
        "runs": [{"name": r.name, "swept": r.swept, "overrides": r.overrides, "workdir": r.workdir} for r in runs],
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path


Runner = Callable[[list[str], str], int]  # (argv, log path) -> exit code


def subprocess_runner(argv: list[str], log_path: str) -> int:
    """Run one training command, appending its output to `log_path`."""
    with open(log_path, "a") as log:
        return subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)


def run_local(runs: Sequence[Run], *, runner: Runner = subprocess_runner,
              entry: Sequence[str] = (sys.executable, "-m", "klingjax.main")) -> dict[str, str]:
    """Run unfinished runs one after another; returns {run name: "skipped" | "done"}. Raises on a failure."""
    finished = {run.name: is_finished(run) for run in runs}  # checks every marker before starting anything
    status = {}
    for i, run in enumerate(runs):
        if finished[run.name]:
            logging.info("[%d/%d] %s: finished earlier, skipping", i + 1, len(runs), run.name)
            status[run.name] = "skipped"
            continue
        os.makedirs(run.workdir, exist_ok=True)
        log_path = os.path.join(run.workdir, "train.log")
        resumed = os.path.isdir(run.workdir) and any(n in os.listdir(run.workdir) for n in ("vae", "dit"))
        logging.info("[%d/%d] %s: %s (log: %s)", i + 1, len(runs), run.name, "resuming" if resumed else "starting",
                     log_path)
        started, t0 = time.time() - 1.0, time.time()
        code = runner(run.argv(entry), log_path)
        if code != 0 or not _completed(run, started):
            raise RuntimeError(f"run {run.name!r} {'failed with exit code ' + str(code) if code else 'did not finish'}"
                               f"; see {log_path}. Rerun the sweep to resume it.")
        marker = os.path.join(run.workdir, DONE_MARKER)
        with open(marker + ".tmp", "w") as f:  # written whole, then renamed: a kill never leaves a partial marker
            json.dump({**_marker_key(run), "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
                       "seconds": round(time.time() - t0, 1)}, f, indent=2)
        os.replace(marker + ".tmp", marker)
        logging.info("[%d/%d] %s: done in %.0fs", i + 1, len(runs), run.name, time.time() - t0)
        status[run.name] = "done"
    return status


def commands(runs: Sequence[Run], launcher: str, *, local_entry: Sequence[str]) -> list[str]:
    """Shell lines for every run: the local command, or wrapped in the TPU-pod / SLURM launcher."""
    prefix = LAUNCHERS[launcher]
    entry = local_entry if launcher == "local" else TRAIN_ENTRY
    lines = []
    for run in runs:
        argv = run.argv(entry)
        if launcher == "slurm":
            argv = [prefix[0], f"--job-name={run.name}", *prefix[1:], *argv]
        else:
            argv = [*prefix, *argv]
        # Keep ${VAR} placeholders of the launcher expandable by the shell.
        lines.append(" ".join(a if a.startswith("--") and "${" in a else shlex.quote(a) for a in argv))
    return lines


def planned(runs: Sequence[Run], target: str) -> str:
    """Each run's predicted cost on `target` (a markdown table; see klingjax/plan)."""
    from klingjax.plan import cli as plan_cli

    plan_cli.fake_devices()  # before JAX's backend starts
    exps = {}
    for run in runs:
        config = load_base_config(run.config)
        for key, value in run.overrides.items():
            _apply(config, key, value, f"run {run.name!r}")
        exps[run.name] = to_experiment(config)
    return plan_cli.predict_runs(exps, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep file, optionally :arg (e.g. experiments/ablation_sweep.py:runlocal)")
    parser.add_argument("--workdir_root", default="workdirs/sweeps", help="runs go to ROOT/<sweep name>/<run name>")
    parser.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local",
                        help="local: run here one after another; tpu_pod / slurm: print the cluster commands")
    parser.add_argument("--no_report", action="store_true", help="do not write the report after a local sweep")
    parser.add_argument("--plan", metavar="TARGET", help="first print each run's predicted step time, MFU and "
                        "memory on TARGET (e.g. v5p-256, h100:64; klingjax-plan's model, abstract compiles)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)

    try:
        sweep, sweep_file = load_sweep(args.sweep)
        runs = expand(sweep, sweep_file, args.workdir_root)
        if args.plan:
            sys.stdout.write(planned(runs, args.plan) + "\n")
        if args.dry_run or args.launcher != "local":
            todo = [r for r in runs if not is_finished(r)]
            local_entry = ("python", "-m", "klingjax.main")
            sys.stdout.write("".join(line + "\n" for line in commands(todo, args.launcher, local_entry=local_entry)))
            return 0
        sweep_dir = _join(args.workdir_root, sweep.name)
        write_sweep_json(sweep, sweep_file, runs, sweep_dir)
        t0 = time.time()
        status = run_local(runs)
    except SweepError as e:
        logging.error("invalid sweep: %s", e)
        return 2
    except RuntimeError as e:
        logging.error("%s", e)
        return 1
    logging.info("sweep %s: %d run(s) done, %d skipped in %.0fs", sweep.name, list(status.values()).count("done"),
                 list(status.values()).count("skipped"), time.time() - t0)
    if not args.no_report:
        from launch.report import write_report

        logging.info("report: %s", write_report(sweep_dir))
    return 0


if __name__ == "__main__":
    # Run as launch.sweep (not __main__), so sweep files importing `launch.sweep.Sweep` get the same class.
    from launch import sweep as _sweep

    sys.exit(_sweep.main())
