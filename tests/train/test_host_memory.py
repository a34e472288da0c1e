"""tcmalloc for CPU training: XLA:CPU's per-call temp buffer stops being page-faulted in on every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from klingjax.train import host_memory

# Re-execs itself under tcmalloc (when the argument says so), then runs a jitted function whose 94 MiB temp buffer
# (the optimization barrier materialises sin(x)) is allocated per call; prints the allocator and the MiB of minor
# page faults per call after warm-up calls.
_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    from klingjax.train import host_memory
    if sys.argv[1] == "tcmalloc":
        host_memory.reexec_with_tcmalloc()
    import jax, jax.numpy as jnp
    x = jnp.ones((6000, 4096), jnp.float32)
    f = jax.jit(lambda x: jax.lax.optimization_barrier(jnp.sin(x)).sum())
    assert f.lower(x).compile().memory_analysis().temp_size_in_bytes > 90 * 2**20
    for _ in range(3):  # warm-up: a call may start before the previous call's temp buffer is freed
        f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 6 * resource.getpagesize() / 2**20
    print(os.environ.get("LD_PRELOAD", "") + "|" + str(faults))
""")


def run_script(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KLINGJAX_HOST_MALLOC")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    preload, faults = out.stdout.strip().splitlines()[-1].rsplit("|", 1)
    return preload, float(faults)


@pytest.mark.skipif(host_memory.find_tcmalloc() is None, reason="no tcmalloc (apt install libtcmalloc-minimal4)")
def test_tcmalloc_reuses_xla_temp_buffers():
    preload, default = run_script("default")
    assert "tcmalloc" not in preload
    # glibc: the 94 MiB block is mmapped on an XLA thread and unmapped on free, every call.
    assert default > 80, default
    preload, faults = run_script("tcmalloc")
    assert "tcmalloc" in preload  # the script re-executed itself
    # Reused: at most an occasional call finds both cached blocks still busy (the previous call's not yet freed).
    assert faults < 20, faults


def test_tcmalloc_env_decisions(tmp_path, monkeypatch):
    lib = str(tmp_path / "libtcmalloc_minimal.so.4")
    open(lib, "w").close()
    assert host_memory.find_tcmalloc((str(tmp_path / "none"), str(tmp_path))) == lib
    assert host_memory.find_tcmalloc((str(tmp_path / "none"),)) is None

    cpu = {"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "/x/libfoo.so"}
    env, why = host_memory.tcmalloc_env(cpu, lib)
    assert env["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and env["JAX_PLATFORMS"] == "cpu" and lib in why
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in env
    # Nothing to do: already preloaded (no re-exec loop), opted out, an accelerator, no library.
    assert host_memory.tcmalloc_env(env, lib)[0] is None
    assert host_memory.tcmalloc_env({**cpu, "KLINGJAX_HOST_MALLOC": "default"}, lib)[0] is None
    env, why = host_memory.tcmalloc_env({"JAX_PLATFORMS": "cuda,cpu"}, lib)
    assert env is None and "accelerator" in why
    env, why = host_memory.tcmalloc_env(cpu, None)
    assert env is None and "libtcmalloc-minimal4" in why
