"""Accelerator table: published peak FLOP/s, HBM size and bandwidth, and link bandwidths, one row per chip.

Sources (benchmarks/RESULTS.md lists them with the calibration): Google Cloud TPU docs (v4, v5e, v5p, v6e pages:
peak bf16, HBM, bidirectional ICI per chip), NVIDIA datasheets (A100/H100/H200/B200 SXM: dense bf16 without
sparsity, HBM, NVLink bidirectional per GPU). Network per GPU assumes one 400 Gb/s NIC per GPU (200 Gb/s on A100
systems), as in DGX/HGX reference designs. The efficiencies are this planner's assumptions, stated, not published.

Targets: "v5p-256" (TPU names count TensorCores: v4/v5p have 2 per chip, so v5p-256 is 128 chips; v5e/v6e count
chips), "h100:64" or "64xh100" (GPUs).
"""

from __future__ import annotations

import dataclasses
import math
import re

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: per-chip peak and bandwidths (bytes/s are one direction unless named `_bidir`)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s (the CPU entry: measured fp32 matmul rate)
    hbm_bytes: float
    hbm_bw: float
    ici_bidir: float  # TPU ICI or GPU NVLink, bidirectional bytes/s per chip
    net_bw: float  # per chip, one direction, between nodes (GPU) or slices (TPU DCN)
    torus_dims: int = 0  # TPU: 2 or 3 (ring collectives on k of D torus dims use k/D of ICI); GPU: 0
    node_size: int = 8  # GPUs per NVLink domain (TPU: the whole slice is one ICI domain)
    cores_per_chip: int = 1  # TensorCores counted by the TPU name (v5p-256 = 128 chips)
    flash_attention: bool = True  # attention never writes its (N, N) scores to HBM (splash / cuDNN flash)
    matmul_eff: float = 0.8  # achievable fraction of peak on large bf16 matmuls (assumption)
    attention_eff: float = 0.6  # flash attention fwd+bwd fraction of peak (assumption)
    hbm_eff: float = 0.85  # achievable fraction of HBM bandwidth (assumption)
    link_eff: float = 0.8  # achievable fraction of link bandwidth in a collective (assumption)
    latency: float = 5e-6  # seconds per collective hop (alpha term)

    @property
    def is_tpu(self) -> bool:
        return self.torus_dims > 0


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * 2**30, 1228 * GB, 300 * GB, 25 * GB / 8, torus_dims=3, cores_per_chip=2,
               matmul_eff=0.85, latency=2e-6),
    "v5e": Chip("TPU v5e", 197e12, 16 * GB, 819 * GB, 400 * GB, 25 * GB / 8, torus_dims=2, matmul_eff=0.85,
                latency=2e-6),
    "v5p": Chip("TPU v5p", 459e12, 95 * GB, 2765 * GB, 1200 * GB, 50 * GB / 8, torus_dims=3, cores_per_chip=2,
                matmul_eff=0.85, latency=2e-6),
    "v6e": Chip("TPU v6e", 918e12, 32 * GB, 1640 * GB, 800 * GB, 100 * GB / 8, torus_dims=2, matmul_eff=0.85,
                latency=2e-6),
    "a100": Chip("A100 80GB SXM", 312e12, 80 * GB, 2039 * GB, 600 * GB, 200 * GB / 8, matmul_eff=0.75),
    "h100": Chip("H100 SXM", 989e12, 80 * GB, 3350 * GB, 900 * GB, 400 * GB / 8, matmul_eff=0.7),
    "h200": Chip("H200 SXM", 989e12, 141 * GB, 4800 * GB, 900 * GB, 400 * GB / 8, matmul_eff=0.7),
    "b200": Chip("B200 SXM", 2250e12, 180 * GB, 8000 * GB, 1800 * GB, 400 * GB / 8, matmul_eff=0.7),
}


def cpu_chip(peak_flops: float, mem_bw: float, mem_bytes: float = 64 * 2**30) -> Chip:
    """This machine as a 'chip': its measured matmul peak and memory bandwidth; XLA attention, one device."""
    # Fake CPU devices share one memory: a collective is a copy through it.
    return Chip("cpu (measured)", peak_flops, mem_bytes, mem_bw, 2 * mem_bw, mem_bw, node_size=1 << 20,
                flash_attention=False, matmul_eff=1.0, attention_eff=1.0, hbm_eff=1.0, link_eff=1.0, latency=0.0)


def parse_target(target: str) -> tuple[Chip, int]:
    """'v5p-256' -> (v5p, 128 chips); 'h100:64' / '64xh100' -> (h100, 64)."""
    t = target.strip().lower()
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", t):
        chip = CHIPS[m.group(1)]
        cores = int(m.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"target {target!r}: {cores} cores is not a whole number of {chip.name} chips")
        return chip, cores // chip.cores_per_chip
    m = re.fullmatch(r"([a-z0-9]+):(\d+)", t) or re.fullmatch(r"(\d+)x([a-z0-9]+)", t)
    if m:
        name, n = (m.group(1), m.group(2)) if ":" in t else (m.group(2), m.group(1))
        if name in CHIPS:
            return CHIPS[name], int(n)
    raise ValueError(f"unknown target {target!r}; use e.g. v5p-256, v6e-64, h100:64, 8xh200 "
                     f"(chips: {sorted(CHIPS)})")


def ici_bandwidth(chip: Chip, group: int, num_chips: int) -> float:
    """One-direction bytes/s a ring collective over `group` chips gets on a TPU torus of `num_chips` chips.

    A bidirectional ring on one torus dimension uses 2 of the 2*D ports; a group larger than one side spans
    k = ceil(log(group) / log(side)) dimensions and uses 2k ports (XLA's multi-dimensional collectives).
    """
    side = max(2.0, num_chips ** (1.0 / chip.torus_dims))
    k = min(chip.torus_dims, max(1, math.ceil(math.log(group) / math.log(side) - 1e-9)))
    return chip.ici_bidir / 2 * k / chip.torus_dims
