"""Predict a DiT train step on a pod: compile it abstractly (the dry run), then cost the compiled program.

The per-device program is what matters. A target mesh (data, fsdp, context, tensor) is compiled on a smaller
*compile mesh* with the same context and tensor sizes, data -> min(data, 2), fsdp -> min(fsdp, 4), and the
global batch scaled so every device holds the same batch shard; so the per-device activations, matmuls and
attention are the target's. What differs is re-derived for the target:
  * state (params / AdamW / EMA) per device: exact, from the target mesh's shardings (an AbstractMesh);
  * memory: `memory_analysis()` of the compiled program with the state part swapped for the target's (temp also
    holds one gradient copy of the model: swapped likewise); equal to `memory_analysis()` when the meshes agree.
    That program uses XLA attention (CPU); for chips with flash attention, where score buffers dominate temp,
    two more compiles at 1/2 and 1/4 of the clip width fit temp = A + B N + C N^2 and drop the N^2 term;
  * collectives: each one's replica groups are mapped to the mesh axes they span; payloads of FSDP gathers and
    gradient reductions are the full arrays (independent of the axis size), so only the group size changes.
Costs (per device, loop trip counts applied, see `hlo.py`):
  * compute: per instruction max(FLOPs / (peak x matmul_eff), bytes / (HBM bw x hbm_eff)); attention score
    matmuls at peak x attention_eff and their (N, N) intermediates never in HBM on chips with flash attention
    (the CPU compile uses XLA attention; its score buffers are also removed from the flash memory estimate);
  * collectives: ring algorithm, payload x (g-1)/g (all-gather, reduce-scatter, all-to-all), 2x that
    (all-reduce), payload (collective-permute), over ICI / NVLink within a node or the network across nodes;
  * step = max(compute, collectives): XLA's async collectives overlap the layer loop (stated assumption); the
    no-overlap sum is printed as the upper bound.
MFU = model FLOPs (3 x forward matmul FLOPs, no remat recompute) / (step x chips x peak).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import jax
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import ExperimentConfig
from klingjax.models.dit import DiTConfig, dit_config
from klingjax.plan import hlo
from klingjax.plan.chips import Chip, ici_bandwidth
from klingjax.sharding.mesh import resolve_mesh_shape
from klingjax.sharding.rules import MESH_AXES, get_rules
from klingjax.train import dry_run, stages
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer, state_shardings

_SCALED = {"data": 2, "fsdp": 4}  # compile-mesh caps of the axes whose size only changes collective groups


@dataclasses.dataclass(frozen=True)
class Plan:
    """A predicted step on `num_chips` chips of `chip` (times in seconds, bytes per device)."""

    variant: str
    chip: str
    num_chips: int
    mesh: dict[str, int]
    compile_mesh: dict[str, int]
    preset: str
    remat: str
    batch: int
    tokens_per_clip: int
    model_flops: float  # per step, whole pod
    device_flops: float  # per device, from the HLO (remat included)
    traffic: float  # HBM bytes per device (score buffers excluded on flash-attention chips)
    compute_s: float
    comm_s: float
    step_s: float
    no_overlap_s: float
    mfu: float
    tokens_per_s: float
    state: dict[str, int]  # model / optimizer / ema per device on the target mesh
    memory: dict[str, int]  # argument / output / temp / alias / generated_code (+ peak), target mesh, as compiled
    peak_flash: int  # peak with attention scores removed (chips with flash attention)
    fits: bool
    costs: tuple[tuple[str, int, float], ...]  # (what, executions per step, seconds per step), largest first
    compile_s: float


def compile_mesh(sizes: dict[str, int], budget: int = 64) -> dict[str, int]:
    """A small mesh with the target's per-device shard shapes (data and fsdp capped, see module doc).

    With large context x tensor, data shrinks to 1 and fsdp to 2 (never 1 when the target shards over fsdp,
    so the FSDP collectives stay in the program) to stay near `budget` devices.
    """
    small = {a: min(s, _SCALED[a]) if a in _SCALED else s for a, s in sizes.items()}
    while math.prod(small.values()) > budget and (small["data"] > 1 or small["fsdp"] > 2):
        axis = "data" if small["data"] > 1 else "fsdp"
        small[axis] //= 2
    return small


def model_flops(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], text_len: int) -> float:
    """Train-step model FLOPs: 3 x forward matmul FLOPs (as benchmarks/dit_step.py counts them)."""
    n, d, f = math.prod(grid), cfg.dim, cfg.ffn_dim
    tok, txt = batch * n, batch * text_len
    layer = 12 * tok * d * d + 4 * txt * d * d + 4 * tok * d * f + 4 * batch * n * n * d + 4 * batch * n * text_len * d
    embed = (2 * tok * d * math.prod(cfg.patch_size) * (cfg.in_channels + cfg.out_channels)
             + 2 * txt * (cfg.text_dim * d + d * d) + 2 * batch * (cfg.freq_dim * d + 7 * d * d))
    return 3.0 * (cfg.num_layers * layer + embed)


def abstract_trainer(exp: ExperimentConfig) -> nnx.State:
    """The DiT stage's trainer state (model + optimizer + EMA), shapes only, as the dry run builds it."""
    text_dim = dit_config(exp.dit.variant, **exp.dit.model_overrides).text_dim
    null_text = (np.zeros((exp.text_max_len, text_dim), np.float32), np.zeros((exp.text_max_len,), bool))
    spec = stages.dit_stage(exp, workdir="", null_text=null_text)
    tx = make_optimizer(exp.dit.optim, exp.dit.steps)
    return nnx.split(nnx.eval_shape(lambda: Trainer(spec.make_model(nnx.Rngs(exp.seed)), tx)))[1]


def target_state_bytes(exp: ExperimentConfig, sizes: dict[str, int], abstract: nnx.State | None = None
                       ) -> dict[str, int]:
    """Per-device bytes of model / optimizer / EMA on the target mesh (no devices needed: an AbstractMesh)."""
    abstract = abstract_trainer(exp) if abstract is None else abstract
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    shardings = state_shardings(abstract, mesh, get_rules(exp.dit.sharding, "dit"))
    sds = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return dry_run.state_bytes(sds)[1]


def group_axes(group: tuple[int, ...], shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which the devices of one replica group differ (ids are row-major mesh positions)."""
    coords = np.array(np.unravel_index(np.asarray(group), tuple(shape.values()))).T  # (g, 4)
    return tuple(a for i, a in enumerate(shape) if len(set(coords[:, i])) > 1)


def collective_seconds(kind: str, payload: float, group: int, intra_node: bool, chip: Chip,
                       num_chips: int) -> float:
    """Ring-algorithm time of one collective of `payload` bytes over `group` chips."""
    if group <= 1:
        return 0.0
    if chip.is_tpu:
        bw = ici_bandwidth(chip, group, num_chips)
    else:
        bw = chip.ici_bidir / 2 if intra_node else chip.net_bw
    bw *= chip.link_eff
    frac = {"all-reduce": 2.0 * (group - 1) / group, "collective-permute": 1.0}.get(kind, (group - 1) / group)
    return payload * frac / bw + chip.latency * (group - 1)


def _score_like(dims: tuple[tuple[int, ...], ...], tokens: int, context: int) -> bool:
    """An array with two trailing dims of query and key length: attention logits / probabilities."""
    lengths = {tokens, tokens // max(context, 1)}
    return any(len(d) >= 3 and d[-1] in lengths and d[-2] in lengths and tokens > 1 for d in dims)


def _score_bytes(program: hlo.Program, tokens: int, context: int) -> int:
    """Bytes of every distinct attention-score buffer the program writes (each instruction once, not per layer)."""
    return int(sum(op.out_bytes for op in program.ops if op.dims and _score_like(op.dims[:1], tokens, context)))


def _compiled(exp: ExperimentConfig, devices: list[jax.Device], cache: dict) -> tuple[dry_run.DryRunReport,
                                                                                       hlo.Program]:
    """The dry run of `exp` on `devices` and its parsed HLO, compiled once per distinct (mesh, batch, model)."""
    key = (exp.mesh.sizes, exp.dit.batch_size, exp.dit.sharding, exp.data.num_frames, exp.data.height,
           exp.data.width, exp.text_max_len, exp.dit.variant, tuple(sorted(map(str, exp.dit.model_overrides.items()))))
    if key not in cache:
        report = dry_run.dry_run(exp, devices)
        cache[key] = (report, hlo.parse(report.compiled.as_text(), len(devices)))
    return cache[key]


def flash_temp(exp: ExperimentConfig, devices: list[jax.Device], cache: dict, temp: int, tokens: int) -> int:
    """Temp bytes without attention scores: fit temp(N) = A + B N + C N^2 over the clip at width w, w/2, w/4
    (three compiles of the same program at 1, 1/2, 1/4 of the tokens), return A + B N: the (B, H, N, N) score
    buffers of XLA attention are the N^2 term, which flash attention never allocates.
    """
    points = [(tokens, temp)]
    for div in (2, 4):
        width = exp.data.width // div
        if exp.data.width % div or width % 16:
            return temp  # cannot shrink the clip exactly: keep the XLA-attention figure
        small = dataclasses.replace(exp, data=dataclasses.replace(exp.data, width=width))
        report, _ = _compiled(small, devices, cache)
        points.append((tokens // div, report.memory.get("temp", 0)))
    n = np.array([p[0] for p in points], float)
    a, b, _ = np.linalg.solve(np.stack([np.ones_like(n), n, n * n], 1), np.array([p[1] for p in points], float))
    return int(min(max(a + b * tokens, 0.0), temp))


def estimate(exp: ExperimentConfig, chip: Chip, num_chips: int, sizes: dict[str, int],
             devices: list[jax.Device], cache: dict | None = None) -> Plan:
    """Compile `exp`'s DiT train step for `sizes` (on the compile mesh) and predict it on `chip` x `num_chips`.

    `cache` (a dict the caller keeps) reuses one compile for target meshes sharing a compile mesh.
    """
    if math.prod(sizes.values()) != num_chips:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, target has {num_chips}")
    dp = sizes["data"] * sizes["fsdp"]
    if exp.dit.batch_size % dp:
        raise ValueError(f"batch {exp.dit.batch_size} is not divisible by data x fsdp = {dp}")
    small = compile_mesh(sizes)
    n_small = math.prod(small.values())
    if n_small > len(devices):
        raise ValueError(f"compile mesh {small} needs {n_small} devices, {len(devices)} available "
                         f"(raise --xla_force_host_platform_device_count)")
    batch_small = exp.dit.batch_size // dp * small["data"] * small["fsdp"]
    exp_small = dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, **small),
                                    dit=dataclasses.replace(exp.dit, batch_size=batch_small))
    cache = {} if cache is None else cache
    report, program = _compiled(exp_small, devices[:n_small], cache)

    state = target_state_bytes(exp, sizes) if small != sizes else dict(report.state_per_device)
    d_state = sum(state.values()) - sum(report.state_per_device.values())
    d_model = state.get("model", 0) - report.state_per_device.get("model", 0)
    mem = dict(report.memory)
    if mem:
        mem["argument"] += d_state
        mem["output"] += d_state
        mem["alias"] += d_state if report.memory["alias"] else 0
        mem["temp"] += d_model  # one gradient copy of the model
        mem["peak"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]

    cfg = report.model
    grid = tuple(s // p for s, p in zip(layout.latent_grid(exp)[:3], cfg.patch_size))
    tokens = math.prod(grid)
    context = sizes["context"]
    flash = chip.flash_attention
    costs: dict[str, list] = defaultdict(lambda: [0, 0.0])
    compute = traffic = 0.0
    for op in program.ops:
        attn = _score_like(op.dims, tokens, context)
        if attn and flash:
            t = op.flops / (chip.peak_flops * chip.attention_eff)
        else:
            t = max(op.flops / (chip.peak_flops * chip.matmul_eff), op.bytes / (chip.hbm_bw * chip.hbm_eff))
            traffic += op.bytes * op.count
        kind = "attention" if attn else ("matmul" if op.flops else "memory-bound (elementwise, copies)")
        costs[kind][0] += op.count
        costs[kind][1] += t * op.count
        compute += t * op.count
    opt = 3.0 * d_state / (chip.hbm_bw * chip.hbm_eff)  # optimizer/EMA update reads + writes its shard
    compute = max(compute + opt, 0.0)
    costs["memory-bound (elementwise, copies)"][1] += opt

    comm = 0.0
    node_block = {a: math.prod(list(sizes.values())[i:]) for i, a in enumerate(sizes)}  # ids spanned from axis a
    for c in program.collectives:
        axes = group_axes(c.groups[0], small) if c.groups and len(c.groups[0]) > 1 else ()
        g = math.prod(sizes[a] for a in axes) if axes else 1
        intra = not axes or node_block[axes[0]] <= chip.node_size
        t = collective_seconds(c.kind, c.payload, g, intra, chip, num_chips) * c.count
        comm += t
        key = f"{c.kind} over {'x'.join(axes) or '-'} (g={g}, {dry_run.fmt_bytes(c.payload)})"
        costs[key][0] += c.count
        costs[key][1] += t

    step = max(compute, comm)
    flops = model_flops(cfg, exp.dit.batch_size, grid, exp.text_max_len)
    peak = mem.get("peak", sum(state.values()))
    peak_flash = peak
    if flash and mem and _score_bytes(program, tokens, context) > 0.05 * report.memory["temp"]:
        temp = flash_temp(exp_small, devices[:n_small], cache, report.memory["temp"], tokens)
        peak_flash = peak - (report.memory["temp"] - temp)
    ranked = sorted(((k, n, t) for k, (n, t) in costs.items()), key=lambda r: -r[2])
    return Plan(
        variant=exp.dit.variant, chip=chip.name, num_chips=num_chips, mesh=dict(sizes), compile_mesh=small,
        preset=exp.dit.sharding, remat=cfg.remat.value, batch=exp.dit.batch_size, tokens_per_clip=tokens,
        model_flops=flops, device_flops=program.dot_flops, traffic=traffic + 3.0 * d_state, compute_s=compute,
        comm_s=comm, step_s=step, no_overlap_s=compute + comm, mfu=flops / (step * num_chips * chip.peak_flops),
        tokens_per_s=exp.dit.batch_size * tokens / step, state=state, memory=mem, peak_flash=int(peak_flash),
        fits=peak_flash <= chip.hbm_bytes, costs=tuple(ranked), compile_s=report.compile_seconds,
    )


def mesh_sizes(exp: ExperimentConfig, num_chips: int) -> dict[str, int]:
    """The config's mesh resolved for `num_chips` (one axis may be -1)."""
    return dict(zip(MESH_AXES, resolve_mesh_shape(exp.mesh.sizes, num_chips)))


def format_plan(p: Plan, top: int = 8) -> str:
    """A plan as printable lines: summary, memory, and the top costs table."""
    fb = dry_run.fmt_bytes
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    small = " ".join(f"{k}={v}" for k, v in p.compile_mesh.items())
    lines = [
        f"plan: DiT {p.variant} on {p.num_chips} x {p.chip}, mesh {mesh} (compiled on {small}), preset {p.preset}, "
        f"remat {p.remat}; batch {p.batch} x {p.tokens_per_clip} tokens",
        f"predicted step {p.step_s:.3f} s (compute {p.compute_s:.3f} s, collectives {p.comm_s:.3f} s, "
        f"no-overlap bound {p.no_overlap_s:.3f} s); MFU {100 * p.mfu:.1f}%; {p.tokens_per_s:,.0f} tokens/s",
        f"per device: {p.device_flops / 1e12:.2f} TFLOP (HLO, remat incl.), {fb(p.traffic)} HBM traffic; model "
        f"{p.model_flops / p.num_chips / 1e12:.2f} TFLOP",
        "memory per device: " + " + ".join(f"{k} {fb(v)}" for k, v in p.state.items())
        + (f"; compiled argument {fb(p.memory['argument'])}, output {fb(p.memory['output'])}, temp "
           f"{fb(p.memory['temp'])}, alias {fb(p.memory['alias'])}; peak {fb(p.memory['peak'])} (XLA attention), "
           f"{fb(p.peak_flash)} with flash attention -> {'FITS' if p.fits else 'DOES NOT FIT'}"
           if p.memory else ""),
        "| cost | per step | seconds | share |",
        "|---|---|---|---|",
    ]
    total = sum(t for _, _, t in p.costs) or 1.0
    lines += [f"| {k} | {n} | {t:.4f} | {100 * t / total:.1f}% |" for k, n, t in p.costs[:top]]
    return "\n".join(lines)
