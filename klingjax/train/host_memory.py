"""Run CPU training under tcmalloc, so XLA:CPU's per-step buffers are reused instead of page-faulted in again.

Every execution of a compiled XLA:CPU program allocates its temp buffer (728 MiB for the variant-S DiT train step
of `benchmarks/dit_step.py`: saved activations, gradients) with `posix_memalign` on an XLA worker thread and frees
it at the end. glibc serves a block that large with a fresh `mmap` and gives it back with `munmap` (a per-thread
arena cannot hold it), so every step the kernel zero-fills and faults in all of it again: 186,434 minor faults
per step there, about a fifth of the step. tcmalloc keeps freed spans mapped and hands them out again: 0 faults
per step after the first. (Tuning glibc with `mallopt` — one arena, no mmap, no trim — also removes the faults
on some runs but not others: `posix_memalign` slack fragments the heap. It is not used.)

`reexec_with_tcmalloc()` restarts the process image (`os.execve`, same pid, same argv) with tcmalloc in
`LD_PRELOAD`, because an allocator can only be swapped before the process starts. `klingjax-train` and
`benchmarks/dit_step.py` call it first thing. It does nothing when
  * JAX will run on an accelerator (`JAX_PLATFORMS`, or a CUDA/ROCm/TPU plugin installed),
  * tcmalloc is already preloaded, or `KLINGJAX_HOST_MALLOC=default` asks for the system allocator,
  * no tcmalloc library is installed (Debian/Ubuntu: `apt install libtcmalloc-minimal4`); it logs that hint.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping

from absl import logging

TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# Distributions that give JAX an accelerator backend; with one installed JAX defaults to it, not to the CPU.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
# tcmalloc prints a warning with a stack trace for every allocation above this many bytes (default 1 GiB).
_REPORT_THRESHOLD = str(2**40)


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for d in dirs:
        for name in TCMALLOC_NAMES:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def jax_will_run_on_cpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any backend."""
    platforms = env.get("JAX_PLATFORMS", env.get("JAX_PLATFORM_NAME", "")).strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    return not any(n.startswith(p) for n in names for p in _ACCELERATOR_PLUGINS)


def tcmalloc_env(env: Mapping[str, str], library: str | None) -> tuple[dict[str, str] | None, str]:
    """(the environment to re-exec with, or None to keep this process; why), for `library` (None: not found)."""
    preload = env.get("LD_PRELOAD", "")
    if env.get("KLINGJAX_HOST_MALLOC", "").lower() == "default":
        return None, "system malloc (KLINGJAX_HOST_MALLOC=default)"
    if "tcmalloc" in preload:
        return None, f"tcmalloc (preloaded: {preload})"
    if not jax_will_run_on_cpu(env):
        return None, "system malloc (JAX runs on an accelerator)"
    if library is None:
        return None, ("system malloc: no tcmalloc found; on CPU each step page-faults its XLA buffers in again "
                      "(apt install libtcmalloc-minimal4 for faster steps)")
    new = dict(env)
    new["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    new.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", _REPORT_THRESHOLD)
    return new, f"tcmalloc ({library})"


def reexec_with_tcmalloc() -> str:
    """Re-exec this process with tcmalloc preloaded when that helps (see module doc); else say which malloc runs."""
    env, why = tcmalloc_env(os.environ, find_tcmalloc())
    if env is None:
        return why
    logging.info("re-executing under %s", why)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # does not return
    return why  # unreachable
