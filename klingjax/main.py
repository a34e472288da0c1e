"""`klingjax-train`: run an experiment config's stages.

    klingjax-train --config experiments/demo.py --workdir /tmp/demo
    klingjax-train --config experiments/demo.py:runlocal --workdir /tmp/tiny --config.dit.steps=50
    python -m klingjax.main --config ... --workdir ...   (same thing)
    klingjax-train --config experiments/t2v_recipe.py --config.dit.variant=14B --dry_run
        (compile the DiT train step for the configured mesh, print params/optimizer/compiled memory per device,
        exit; no data, checkpoints or --workdir needed: see klingjax/train/dry_run.py)

On CPU the process re-executes itself with tcmalloc preloaded when one is installed (XLA:CPU's per-step
buffers are then reused instead of page-faulted in each step; KLINGJAX_HOST_MALLOC=default opts out).

Multi-host: on TPU pods and SLURM, `jax.distributed.initialize()` auto-detects the cluster; for several
local processes pass --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

import logging as pylogging
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from klingjax.config import ConfigError, to_experiment
from klingjax.train import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (data, checkpoints, metrics, report).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (local multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (local multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (local multi-process).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the DiT stage's train step abstractly on the configured "
                             "mesh, print param/optimizer/compiled memory per device and exit (no training).")

# Any of these means "a cluster started us": call jax.distributed.initialize() and let it auto-detect.
# KLINGJAX_DISTRIBUTED=1 is set by launch/tpu_pod.sh (a TPU VM's ssh session has none of the others).
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                "KLINGJAX_DISTRIBUTED")
# What `run()` chose (tcmalloc re-exec or why not); logged by `main` once logging is set up.
_MALLOC = "not chosen"


def initialize_distributed() -> None:
    """Call jax.distributed.initialize once: explicitly for local processes, auto-detected on clusters."""
    if _COORDINATOR.value:
        # Must not touch a backend before initialize (jax.default_backend() would); the setting only
        # affects the CPU client, so it is harmless on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(k in os.environ for k in _CLUSTER_ENV):
        jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
    """Drop INFO records from Orbax and Grain (one line per file written); keep warnings and errors."""

    def filter(self, record) -> bool:
        noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
        return record.levelno >= pylogging.WARNING or not noisy


def main(argv) -> None:
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # Validate before anything compiles: unknown keys were already rejected by lock_config at parse time.
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):  # ml_collections defers a failed load of --config
        try:
            config.to_dict()
        except Exception as e:  # noqa: BLE001 - its load error (missing file, syntax error, bad arg) is the message
            raise app.UsageError(f"--config {flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {e}") from e
    try:
        exp = to_experiment(config)
    except ConfigError as e:
        raise app.UsageError(str(e)) from e
    if _DRY_RUN.value:
        _dry_run(exp)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (only --dry_run runs without one)")
    initialize_distributed()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    logging.info("host allocator: %s", _MALLOC)
    from klingjax.experiment import run_experiment

    results = run_experiment(exp, _WORKDIR.value)
    logging.info("done: %s", {k: v for k, v in results.items() if k == "eval"})


def _dry_run(exp) -> None:
    """Print the dry-run report of the DiT stage (one process; the local devices form the mesh)."""
    from klingjax.train import dry_run

    try:
        report = dry_run.dry_run(exp)
    except ConfigError as e:
        raise app.UsageError(str(e)) from e
    print(dry_run.format_report(report), flush=True)


def run() -> None:
    """Console-script entry point (restarts itself under tcmalloc on CPU first: see train/host_memory.py)."""
    global _MALLOC
    _MALLOC = host_memory.reexec_with_tcmalloc()
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
