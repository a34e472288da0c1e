"""Smoke tests of benchmarks/vae_step.py at --quick sizes: the script runs end to end, checks that klingjax and
diffusers compute the same function (when torch is importable) and ends with its GOAL line."""

import importlib.util
import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "vae_step.py")
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def run_quick(*flags: str) -> str:
    """stdout of `vae_step.py --quick` in a subprocess (glibc malloc, 1 torch thread, XLA at -O0 to compile fast)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--host_malloc", "system", *flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def check_common(stdout: str) -> None:
    """The step was timed and the output ends with a well-formed GOAL line (measured exactly when torch is here)."""
    assert re.search(r"klingjax VAE train step \(fwd\+bwd\+clip\+AdamW\+EMA\): \d+\.\d+ s", stdout), stdout
    goal = stdout.strip().splitlines()[-1]
    if HAS_TORCH:
        pattern = r"same function: diffusers ([\d,]+) params; .* max abs diff (\S+); loss there, abs diff (\S+)"
        match = re.search(pattern, stdout)
        assert match, stdout
        assert f"klingjax: {match.group(1)} params" in stdout  # strict load: the same parameters, one for one
        assert float(match.group(2)) <= 1e-3 and float(match.group(3)) <= 1e-4
        pattern = r"GOAL vae_step_vs_torch: \d+\.\d\dx torch \(\S+ s vs \S+ s\) \(goal <= 0\.7x\) (MET|NOT MET)"
        assert re.fullmatch(pattern, goal), goal
    else:
        assert "torch/diffusers not importable" in stdout
        assert goal == "GOAL vae_step_vs_torch: NOT MEASURED (goal <= 0.7x torch) NOT MET"


def test_vae_step_quick():
    stdout = run_quick("--no_lpips", "--no_forward")
    check_common(stdout)
    assert "LPIPS" not in stdout and "forward only" not in stdout
