"""Launchers: local multi-process command lines and failure propagation; TPU-pod and SLURM dry runs."""

import os
import shlex
import subprocess
import sys
import time

import helpers

from launch import local

REPO = str(helpers.REPO)
TRAIN = ["klingjax-train", "--config", "experiments/t2v_recipe.py:stage1", "--workdir", "gs://b/t2v",
         "--config.stages=('dit','eval')"]


def _sh(*args, env=None):
    out = subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env={**os.environ, **(env or {})})
    return out.returncode, out.stdout.strip(), out.stderr


def test_local_process_specs_and_dry_run():
    specs = local.process_specs(["python", "-m", "x"], 3, port=1234, cpu_devices_per_process=2)
    assert [s.argv[3:] for s in specs] == [
        ["--coordinator_address=127.0.0.1:1234", "--num_processes=3", f"--process_id={i}"] for i in range(3)]
    assert specs[0].env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert local.process_specs(["x"], 1, port=1, cpu_devices_per_process=0)[0].env == {}
    out = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2", "--port=5555", "--dry_run",
                          "--", *TRAIN], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1"]
    assert argv[2:] == [*TRAIN, "--coordinator_address=127.0.0.1:5555", "--num_processes=2", "--process_id=1"]


def test_local_failure_stops_the_others(tmp_path):
    # Process 1 fails at once; process 0 would wait forever (like a peer stuck in a collective).
    code = "import sys, time; i = int(sys.argv[-1].split('=')[1]); time.sleep(60) if i == 0 else sys.exit(3)"
    specs = local.process_specs([sys.executable, "-c", code], 2, port=local.free_port(), cpu_devices_per_process=0)
    t0 = time.time()
    assert local.run_processes(specs, log_dir=str(tmp_path)) == 3
    assert time.time() - t0 < 30
    assert sorted(os.listdir(tmp_path)) == ["process_0.log", "process_1.log"]
    ok = local.process_specs([sys.executable, "-c", "pass"], 2, port=1, cpu_devices_per_process=0)
    assert local.run_processes(ok) == 0


def test_tpu_pod_dry_run():
    code, out, err = _sh("launch/tpu_pod.sh", "--tpu=pod1", "--zone=us-central2-b", "--project=p", "--dry_run",
                         "--", *TRAIN)
    assert code == 0, err
    argv = shlex.split(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
    assert "--zone=us-central2-b" in argv and "--worker=all" in argv and "--project=p" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    assert remote.startswith("cd ~/klingjax && . .venv/bin/activate && KLINGJAX_DISTRIBUTED=1 ")
    # The remote shell gets back exactly the command we passed (quoting survives both shells).
    assert shlex.split(remote.split("KLINGJAX_DISTRIBUTED=1 ", 1)[1]) == TRAIN
    assert _sh("launch/tpu_pod.sh", "--tpu=pod1", "--", *TRAIN)[0] == 2  # no zone: usage, nothing run


def test_slurm_dry_run():
    code, out, err = _sh("launch/slurm_gpu.sbatch", "--dry_run", *TRAIN)
    assert code == 0, err
    assert shlex.split(out) == ["srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1",
                                "--kill-on-bad-exit=1", "--label", *TRAIN]
    _, out, _ = _sh("launch/slurm_gpu.sbatch", "--dry_run", *TRAIN, env={"PER": "node", "SLURM_JOB_NUM_NODES": "4"})
    assert shlex.split(out)[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-task=8"]
    assert _sh("launch/slurm_gpu.sbatch", "--dry_run")[0] == 2
    header = open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header
