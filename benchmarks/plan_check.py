"""Check `klingjax-plan` against this machine: predicted vs measured CPU train-step time of small DiTs.

    python benchmarks/plan_check.py [--variants S,XS] [--batch 4] [--frames 17] [--size 64] [--steps 5]

The machine is the "chip": its peak is the measured fp32 matmul rate (the faster of a 2048^3 and a model-shaped
jitted `jnp.dot`, as benchmarks/dit_step.py measures it) and its memory bandwidth the measured rate of a jitted
elementwise pass over a 512 MiB array (read + write). The plan compiles the same train step abstractly and
costs it with `klingjax.plan.roofline.estimate` on a one-device mesh (no collectives; XLA attention, since the
CPU chip has no flash attention); the real step is the dit_step benchmark's (same config, jitted, warmed up).
The step, the matmuls and the memory pass run in interleaved rounds, so on a shared machine all see the same
load; the GOAL uses medians of all three (best-of figures are printed too). Error = (predicted - measured) /
measured.

Ends with `GOAL plan_cpu_error: <x>% (goal <= 25%) MET|NOT MET` (the worst variant's error, medians).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import dit_step  # benchmarks/dit_step.py: the measured step and the matmul reference
import jax
import jax.numpy as jnp
import numpy as np

from klingjax.plan import chips, roofline
from klingjax.train import host_memory


def memory_pass(device, mib: int = 512) -> tuple[Callable[[], None], float]:
    """(closure running one jitted elementwise pass over a `mib` MiB float32 array, bytes it reads + writes)."""
    x = jax.device_put(jnp.ones((mib * 2**20 // 4,), jnp.float32), device)
    f = jax.jit(lambda a: a * 1.0001 + 1.0)
    f(x).block_until_ready()

    def run() -> None:
        f(x).block_until_ready()

    return run, 2.0 * x.nbytes


def check(variant: str, args, device, cache: dict) -> tuple[float, float, roofline.Plan]:
    """(measured seconds, predicted seconds, plan) of one variant's train step on `device`."""
    exp = dit_step.experiment(variant, args.batch, args.frames, args.size, args.size, "demo")
    exp = dataclasses.replace(exp, text_max_len=args.text_len)
    batch = dit_step.make_batch(exp, args.text_len, exp.dit.model_overrides.get("text_dim", 384))
    compiled, state, dev_batch, key, st, _, _ = dit_step.jax_step(exp, batch, [device])
    cfg = dit_step.layout.dit_model_config(exp, batch["text"].shape[-1])
    t, h, w, _ = dit_step.layout.latent_grid(exp)
    tokens = args.batch * (t // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    big, big_flops = dit_step.matmul(device, 2048, 2048, 2048)
    shaped, shaped_flops = dit_step.matmul(device, tokens, cfg.dim, cfg.ffn_dim)
    mem, mem_bytes = memory_pass(device)
    fns = {"step": dit_step.jax_trainer(compiled, state, dev_batch, key), "dot_2048": big, "dot_model": shaped,
           "memory": mem}
    # Interleaved rounds, medians throughout: on a shared machine the step, the matmul peak and the memory
    # bandwidth are measured under the same load (best-of figures are printed too).
    times = dit_step.timed_rounds(fns, warmup=1, steps=args.steps)
    stat = {"median": np.median, "best": np.min}
    out = {}
    for name, f in stat.items():
        peak = max(big_flops / f(times["dot_2048"]), shaped_flops / f(times["dot_model"]))
        bw = mem_bytes / f(times["memory"])
        plan = roofline.estimate(exp, chips.cpu_chip(peak, bw), 1, {"data": 1, "fsdp": 1, "context": 1, "tensor": 1},
                                 [device], cache)
        out[name] = (float(f(times["step"])), plan, peak, bw)
    measured, plan, peak, bw = out["median"]
    best, best_plan, best_peak, best_bw = out["best"]
    print(f"variant {variant} (best of {args.steps}): peak {best_peak / 1e9:.1f} GFLOP/s, memory {best_bw / 1e9:.1f} "
          f"GB/s; step {best:.3f} s; predicted {best_plan.step_s:.3f} s; error "
          f"{100 * (best_plan.step_s - best) / best:+.1f}%", flush=True)
    memory_s = sum(c[2] for c in plan.costs if c[0].startswith("memory-bound"))
    print(f"variant {variant} (medians): measured peak {peak / 1e9:.1f} GFLOP/s, memory {bw / 1e9:.1f} GB/s; "
          f"measured step {measured:.3f} s (median of {args.steps}: {', '.join(f'{x:.3f}' for x in times['step'])}); "
          f"predicted {plan.step_s:.3f} s (of which memory-bound ops {memory_s:.3f} s); "
          f"error {100 * (plan.step_s - measured) / measured:+.1f}%", flush=True)
    print(roofline.format_plan(plan), flush=True)
    return measured, plan.step_s, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="S,XS")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--text_len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    malloc = host_memory.reexec_with_tcmalloc()
    print(f"CPU: {dit_step.cpu_name()}; host allocator: {malloc}", flush=True)
    device = jax.devices("cpu")[0]
    rows = {}
    for variant in args.variants.split(","):
        measured, predicted, _ = check(variant, args, device, {})
        rows[variant] = (measured, predicted, (predicted - measured) / measured)
    print("| variant | measured step (s) | predicted (s) | error |\n|---|---|---|---|")
    for v, (m, p, e) in rows.items():
        print(f"| {v} | {m:.3f} | {p:.3f} | {100 * e:+.1f}% |")
    worst = max(rows, key=lambda v: abs(rows[v][2]))
    err = abs(rows[worst][2])
    print(f"GOAL plan_cpu_error: {100 * err:.1f}% (worst: variant {worst}) (goal <= 25%) "
          f"{'MET' if err <= 0.25 else 'NOT MET'}")


if __name__ == "__main__":
    main()
