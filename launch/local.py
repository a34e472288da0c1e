"""Start N processes of one command on this machine, joined by `jax.distributed` (CPU: gloo collectives).

    python -m launch.local --num_processes=2 -- klingjax-train --config experiments/demo.py:runlocal --workdir /tmp/mp
    python -m launch.local --num_processes=2 --dry_run -- klingjax-train ...     (print the commands only)

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` appended (a free
port is picked), and with `--cpu_devices_per_process=K` (default 1) the environment
`JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=K`. If any process fails, the others are
terminated (they would otherwise wait in a collective forever) and the first failure's exit code is returned.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its argv and the environment variables it adds."""

    index: int
    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """The process as one shell line (environment prefix included)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_specs(command: Sequence[str], num_processes: int, *, port: int,
                  cpu_devices_per_process: int = 1) -> list[ProcessSpec]:
    """The N process specs: `command` + coordinator flags, and the CPU device environment."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("no command given: pass it after `--`")
    env = {}
    if cpu_devices_per_process > 0:
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={cpu_devices_per_process}"}
    return [
        ProcessSpec(i, [*command, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                        f"--process_id={i}"], dict(env))
        for i in range(num_processes)
    ]


def run_processes(specs: Sequence[ProcessSpec], *, log_dir: str | None = None, timeout: float | None = None,
                  poll_s: float = 0.2) -> int:
    """Start every process, wait for all; on the first failure stop the rest. Returns 0 or the failing code."""
    procs: list[subprocess.Popen] = []
    logs = []
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    try:
        for spec in specs:
            out = None
            if log_dir:
                out = open(os.path.join(log_dir, f"process_{spec.index}.log"), "w")  # noqa: SIM115
                logs.append(out)
            procs.append(subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        deadline = None if timeout is None else time.time() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                logging.error("process %d exited with code %d: stopping the others", i, code)
                return code
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.time() > deadline:
                logging.error("timed out after %.0fs: stopping all processes", timeout)
                return 124
            time.sleep(poll_s)
    finally:
        _stop(procs)
        for f in logs:
            f.close()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM the live processes (the train loop checkpoints on it), then SIGKILL after a grace period."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, command): options before `--`, the command after it."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2, help="How many processes to start.")
    parser.add_argument("--cpu_devices_per_process", type=int, default=1,
                        help="Fake CPU devices per process (sets JAX_PLATFORMS=cpu); 0: inherit the environment.")
    parser.add_argument("--port", type=int, default=0, help="Coordinator port on 127.0.0.1; 0: pick a free one.")
    parser.add_argument("--log_dir", default=None, help="Write process I's stdout+stderr to LOG_DIR/process_I.log.")
    parser.add_argument("--timeout", type=float, default=None, help="Stop everything after this many seconds.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands (with their environment).")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    specs = process_specs(command, args.num_processes, port=args.port or free_port(),
                          cpu_devices_per_process=args.cpu_devices_per_process)
    if args.dry_run:
        sys.stdout.write("".join(spec.shell() + "\n" for spec in specs))
        return 0
    return run_processes(specs, log_dir=args.log_dir, timeout=args.timeout)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    sys.exit(main())
