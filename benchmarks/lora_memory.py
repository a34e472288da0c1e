"""Train-state memory of a LoRA (or frozen-subset) fine-tune versus a full fine-tune, per device, on a fake mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/lora_memory.py \\
        [--variant 1.3B] [--rank 32] [--frozen_dtype bfloat16] [--mesh_fsdp 8]

Builds the DiT stage's trainer exactly as `klingjax-train` does (`dry_run.abstract_train_state`: the stage's
`make_model`, optimiser, EMA and sharding rules; for the fine-tune, the frozen params split out once in
`trainable.frozen_dtype` with no optimizer state or EMA, LoRA factors sharded like the kernels they adapt), shape
only, on the configured mesh, and sums the bytes of each part one device holds. Nothing is allocated or compiled
(`klingjax-train --dry_run` adds the compiled step's temporaries). The recipe is experiments/t2v_recipe.py at the
chosen variant (Wan 2.1's 1.3B by default), LoRA on every block's attention and MLP projections.

Ends with one `GOAL` line (issue 27: params + optimizer + EMA of the LoRA rank-32 fine-tune <= 0.35x the full
fine-tune's, per device).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import t2v_recipe  # noqa: E402
from klingjax.config import to_experiment  # noqa: E402
from klingjax.train.dry_run import abstract_train_state, fmt_bytes  # noqa: E402

GOAL_RATIO = 0.35


def _experiment(variant: str, fsdp: int, trainable: dict | None):
    c = t2v_recipe.get_config()
    c.dit.variant = variant
    c.mesh.data, c.mesh.fsdp = 1, fsdp
    c.dit.batch_size = fsdp
    if trainable:
        c.dit.init_from = "/base/dit"  # never read: the state's shape does not depend on it
        for k, v in trainable.items():
            setattr(c.dit.trainable, k, v)
    return to_experiment(c)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="1.3B")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--frozen_dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--mesh_fsdp", type=int, default=len(jax.devices()))
    args = p.parse_args(argv)
    runs = {
        "full fine-tune": None,
        f"LoRA rank {args.rank}, frozen {args.frozen_dtype}": dict(mode="lora", lora_rank=args.rank,
                                                                   lora_alpha=float(args.rank),
                                                                   frozen_dtype=args.frozen_dtype),
        "LoRA, frozen float32": dict(mode="lora", lora_rank=args.rank, lora_alpha=float(args.rank),
                                     frozen_dtype="float32"),
        "attention only (subset), frozen bfloat16": dict(mode="subset", params=("blocks/attn1/",),
                                                         frozen_dtype="bfloat16"),
    }
    print(f"DiT {args.variant}, experiments/t2v_recipe.py, mesh fsdp={args.mesh_fsdp} on {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices; bytes one device holds")
    per_device = {}
    for name, trainable in runs.items():
        ts = abstract_train_state(_experiment(args.variant, args.mesh_fsdp, trainable))
        _, dev = ts.bytes()
        per_device[name] = dev
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in dev.items() if k != "guard")
        print(f"  {name:44s} {parts}; total {fmt_bytes(sum(v for k, v in dev.items() if k != 'guard'))}")
    full = sum(v for k, v in per_device["full fine-tune"].items() if k != "guard")
    lora_name = next(k for k in runs if k.startswith(f"LoRA rank {args.rank}"))
    lora = sum(v for k, v in per_device[lora_name].items() if k != "guard")
    ratio = lora / full
    print(f"GOAL lora_state_memory: {ratio:.3f}x the full fine-tune's params + optimizer + EMA per device "
          f"({fmt_bytes(lora)} vs {fmt_bytes(full)}, {args.variant}, LoRA rank {args.rank}, frozen "
          f"{args.frozen_dtype}, {len(jax.devices())} devices) (goal <= {GOAL_RATIO}x) "
          f"{'MET' if ratio <= GOAL_RATIO else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
