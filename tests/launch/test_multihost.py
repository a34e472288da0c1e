"""2 local processes (launch/local.py, gloo) train the same params as 1 process fed the same global batches.

The data stage is written once into a shared directory. The 2-process run goes through the real entry
point (`klingjax.main` under `launch.local`, 1 CPU device per process); the 1-process reference
(reference_one_process.py, 2 CPU devices, same mesh shape) assembles each global batch from the two
emulated hosts' shards in host order, because the pipeline shards records per process before shuffling.
"""

import glob
import json
import os
import subprocess
import sys

import helpers
import pytest

from experiments import demo
from klingjax.config import config_from_dataclass, to_experiment
from klingjax.experiment import run_experiment

REPO = str(helpers.REPO)
STEPS = 3
OVERRIDES = {"stages": ("vae",), "vae.variant": "tiny", "vae.steps": STEPS, "vae.checkpoint_every": STEPS,
             "vae.log_every": 1}


def _config(data_path):
    c = demo.get_config("runlocal")
    for key, value in {**OVERRIDES, "data.path": data_path}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    data = str(tmp_path / "data")
    c = _config(data)
    run_experiment(to_experiment({**c.to_dict(), "stages": ("data",)}), str(tmp_path / "data_run"))
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.path": data}.items()]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--num_processes=2", "--cpu_devices_per_process=1", "--timeout=540",
         f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", "klingjax.main",
         "--config", "experiments/demo.py:runlocal", "--workdir", two, *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    exp_json = config_from_dataclass(to_experiment(c)).to_json()
    reference = subprocess.run(
        [sys.executable, "tests/launch/reference_one_process.py", exp_json, one, two], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    out, _ = launcher.communicate(timeout=600)
    logs = {p: open(p).read() for p in sorted(glob.glob(str(tmp_path / "logs" / "*.log")))}
    assert launcher.returncode == 0, out.decode()[-2000:] + "\n".join(v[-3000:] for v in logs.values())
    assert reference.returncode == 0, reference.stderr[-4000:]
    result = json.loads(reference.stdout.strip().splitlines()[-1])
    print("2-process vs 1-process:", result)  # shown with -s / -rP: the measured difference

    # Same params after STEPS steps (and the same EMA and optimiser state).
    assert result["steps"] == [STEPS, STEPS]
    assert result["max_abs_param"] > 0.01
    assert result["max_abs_diff_params"] <= 1e-5, result
    assert result["max_abs_diff_state"] <= 1e-5, result

    # Host 0 alone writes logs, metrics and results: each step is logged once, one TensorBoard file.
    records = [json.loads(line) for line in open(os.path.join(two, "vae_metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert len(glob.glob(os.path.join(two, "tensorboard", "vae", "events.*"))) == 1
    assert os.path.exists(os.path.join(two, "results.json"))
    ours = ("experiment.py", "loop.py", "checkpoint.py", "main.py")  # JAX logs its connection before we set levels
    info = [line for line in logs[str(tmp_path / "logs" / "process_1.log")].splitlines()
            if line[:1] == "I" and line[1:5].isdigit() and any(f" {m}:" in line for m in ours)]
    assert not info, f"process 1 wrote INFO logs: {info[:3]}"
    # The checkpoint holds every host's iterator state (Orbax writes the JSON item from host 0 only).
    data_iter = json.load(open(os.path.join(two, "vae", "checkpoints", str(STEPS), "data_iter", "metadata")))
    assert data_iter["process_count"] == 2 and {"process_0", "process_1"} <= set(data_iter)
