"""DiT train-step benchmark: klingjax versus diffusers `WanTransformer3DModel` + torch AdamW, and achieved FLOP/s.

    python benchmarks/dit_step.py [--variant S] [--batch 4] [--frames 17] [--size 64] [--steps 5] [--threads N]
                                  [--host_malloc tcmalloc|system]

1. CPU, same process, same thread count. klingjax runs the train step users run: the "dit" stage's loss
   (`stages.dit_stage`: caption dropout, logit-normal timesteps, rectified-flow MSE), `create_trainer` +
   `make_train_step` + `compile_train_step` (forward, backward, global-norm clip, AdamW, EMA), jitted and warmed
   up. diffusers gets the same model config loaded with the same weights (through the export map, strict load)
   and the same work per step: noise + timesteps, forward, MSE to the velocity, backward, `clip_grad_norm_`,
   `torch.optim.AdamW` (same lr/betas/eps/weight decay), zero_grad, EMA lerp. Both, and the matmul reference
   below, are timed in interleaved rounds (1 warm-up, --steps timed) so all see the same machine load; medians.
   The process first re-executes itself under tcmalloc when one is installed (`--host_malloc tcmalloc`, the
   default, as `klingjax-train` does; `system` keeps glibc): both frameworks share the process and so the allocator
   (klingjax/train/host_memory.py says why it matters to XLA:CPU).
   Default config: variant S (dim 256, ffn 1024, 4 heads, 8 layers, text_dim 384) on the demo VAE's latents of
   17 frames at 64x64, (B, 5, 16, 16, 8) -> 320 tokens per clip with patch (1, 2, 2), 16 text tokens.
2. Achieved FLOP/s of the klingjax step versus the machine's measured fp32 matmul throughput (jitted `jnp.dot`s
   of 2048^3 and of the model's biggest matmul shape; the best rate of either), same process, same CPU device.
   Model FLOPs per step = 3 x forward matmul FLOPs (backward = 2 x forward), with 2 FLOPs per multiply-add,
   T = B*N image tokens, S = B*L text tokens, D = dim, F = ffn_dim, per layer:
     self-attn q,k,v,out 8*T*D^2 + cross-attn q,out 4*T*D^2 + cross-attn k,v 4*S*D^2 + MLP 4*T*D*F
     + attention QK^T and AV: 4*B*N*N*D (self) + 4*B*N*L*D (cross)
   plus the patch embedding, output projection and time/text embedders. Cross-checked against XLA's cost
   analysis of the same step with the layer loop unrolled (the scanned program counts its loop body once);
   XLA also counts elementwise work, so it reads a little higher.
3. GPU only (jax.devices()[0].platform == "gpu"): the 1.3B variant at 480p-size token counts (81 frames 480x832 ->
   latents 21x60x104 -> 32760 tokens), batch 1, 512 text tokens, bf16 compute, remat, cuDNN attention; MFU
   versus the device's published dense bf16 peak. Without a GPU that goal reports not measured.

Ends with one `GOAL` line per goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax import layout
from klingjax.config import DataConfig, DiTStageConfig, ExperimentConfig, VAEStageConfig
from klingjax.export import dit_map
from klingjax.export.param_map import to_torch
from klingjax.models.dit import DiTConfig, RematPolicy
from klingjax.models.layers.attention import AttentionImpl
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train import host_memory, stages
from klingjax.train.batch import latent_batch
from klingjax.train.optim import make_optimizer
from klingjax.train.state import Trainer, create_trainer, param_count
from klingjax.train.step import batch_sharding, compile_train_step, make_train_step

# Published dense (no sparsity) bf16 peaks, FLOP/s, matched against `device_kind`.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------


def forward_flops(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one forward pass by part (2 per multiply-add); grid = token grid (T, H, W)."""
    n = math.prod(grid)
    tok, txt, d, f, layers = batch * n, batch * text_len, cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = math.prod(cfg.patch_size)
    return {
        "linear": layers * (8 * tok * d * d + 4 * tok * d * d + 4 * txt * d * d + 4 * tok * d * f),
        "attention": layers * (4 * batch * n * n * d + 4 * batch * n * text_len * d),
        "embed": 2 * tok * d * patch * (cfg.in_channels + cfg.out_channels)
        + 2 * txt * (cfg.text_dim * d + d * d)
        + 2 * batch * (cfg.freq_dim * d + d * d + 6 * d * d),
    }


def train_flops(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], text_len: int) -> float:
    """Model FLOPs of one train step: 3 x forward (remat recompute not counted)."""
    return 3.0 * sum(forward_flops(cfg, batch, grid, text_len).values())


def matmul(device: jax.Device, m: int, k: int, n: int) -> tuple[Callable[[], None], float]:
    """(closure running one jitted, warmed-up fp32 (m, k) @ (k, n) on `device`, its FLOPs)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (m, k), jnp.float32), device)
    b = jax.device_put(jax.random.normal(kb, (k, n), jnp.float32), device)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()

    def run() -> None:
        dot(a, b).block_until_ready()

    return run, 2.0 * m * k * n


# ---------------------------------------------------------------------------------------------------------
# klingjax: the "dit" stage's train step
# ---------------------------------------------------------------------------------------------------------


def experiment(variant: str, batch: int, frames: int, height: int, width: int, vae: str,
               overrides: dict | None = None) -> ExperimentConfig:
    """An experiment whose dit stage trains `variant` on `vae` latents of (frames, height, width) clips."""
    dit = DiTStageConfig(variant=variant, batch_size=batch, sharding="dp", model_overrides=overrides or {})
    return ExperimentConfig(data=DataConfig(num_frames=frames, height=height, width=width),
                            vae=VAEStageConfig(variant=vae), dit=dit)


def make_batch(exp: ExperimentConfig, text_len: int, text_dim: int) -> dict[str, np.ndarray]:
    """A random batch of normalised latents (B, t, h, w, c) and text states (B, L, text_dim), all tokens real."""
    rng = np.random.default_rng(0)
    b = exp.dit.batch_size
    return {
        "latent": rng.standard_normal((b, *layout.latent_grid(exp)), np.float32),
        "text": rng.standard_normal((b, text_len, text_dim), np.float32),
        "text_mask": np.ones((b, text_len), bool),
    }


def null_text(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for the text encoder's empty prompt: hidden (L, text_dim) zeros and a (L,) mask of 2 tokens."""
    text_len, text_dim = batch["text"].shape[1:]
    return np.zeros((text_len, text_dim), np.float32), np.arange(text_len) < 2


def jax_step(exp: ExperimentConfig, batch: dict[str, np.ndarray], devices):
    """(compiled step, state, device batch, key, trainer, mesh, rules) for the dit stage of `exp` on `devices`."""
    spec = stages.dit_stage(exp, workdir="", null_text=null_text(batch))
    cfg = exp.dit
    mesh = make_mesh((-1, 1, 1, 1), devices=devices)
    rules = get_rules(cfg.sharding, "dit")
    st = create_trainer(spec.make_model, make_optimizer(cfg.optim, cfg.steps), mesh, rules, exp.seed)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(st.graphdef, spec.loss_fn, ema_decay=cfg.optim.ema_decay)
        step_fn = compile_train_step(train_step, st.shardings, mesh)
        dev_batch = jax.device_put(latent_batch(batch), batch_sharding(mesh))
        key = jax.device_put(jax.random.key(exp.seed), devices[0])
        compiled = step_fn.lower(st.state, dev_batch, key).compile()
    return compiled, st.state, dev_batch, key, st, mesh, rules


def jax_trainer(compiled, state, batch, key) -> Callable[[], float]:
    """A closure running one compiled train step (state donated and threaded through); returns the loss."""
    box = {"state": state}

    def step() -> float:
        box["state"], metrics = compiled(box["state"], batch, key)
        jax.block_until_ready((box["state"], metrics))
        return metrics["loss"]

    return step


def timed_rounds(fns: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Wall times of each fn, called in turn for warmup + steps rounds (so all see the same machine load).

    A fn returning a loss is checked for finiteness on its last call.
    """
    times = {name: [] for name in fns}
    out = {}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    for name, loss in out.items():
        if loss is not None and not math.isfinite(float(loss)):
            raise RuntimeError(f"{name}: the train step produced a non-finite loss {float(loss)}")
    return times


def xla_flops(exp: ExperimentConfig, batch: dict[str, np.ndarray], mesh, rules) -> float:
    """XLA's FLOP count of the same train step with the layer loop unrolled (lowered only, not compiled)."""
    unrolled = dataclasses.replace(exp, dit=dataclasses.replace(
        exp.dit, model_overrides={**exp.dit.model_overrides, "scan_layers": False}))
    spec = stages.dit_stage(unrolled, workdir="", null_text=null_text(batch))
    tx = make_optimizer(unrolled.dit.optim, unrolled.dit.steps)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Trainer(spec.make_model(nnx.Rngs(0)), tx)))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = make_train_step(graphdef, spec.loss_fn, ema_decay=unrolled.dit.optim.ema_decay)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), latent_batch(batch))
        lowered = jax.jit(step).lower(abstract, shapes, jax.random.key(0))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else float("nan")


# ---------------------------------------------------------------------------------------------------------
# diffusers + torch AdamW, same config and weights
# ---------------------------------------------------------------------------------------------------------


def torch_update(loss, params, ema, optimizer, opt, state: dict) -> float:
    """The torch side's update after its loss, as klingjax's step does it: backward, clip, AdamW, EMA (with
    klingjax's warm-up decay); `state["step"]` counts steps. Returns the loss."""
    import torch

    loss.backward()
    if opt.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    s = state["step"]
    d = min(opt.ema_decay, (1 + s) / (10 + s))
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - d)
    state["step"] = s + 1
    return loss.item()


def torch_trainer(exp: ExperimentConfig, model_state: nnx.State, batch: dict[str, np.ndarray],
                  threads: int) -> Callable[[], float] | None:
    """A closure running one diffusers `WanTransformer3DModel` + torch AdamW step doing the klingjax step's work."""
    try:
        import torch
        from diffusers import WanTransformer3DModel
    except ImportError:
        print("torch/diffusers not importable: skipping the diffusers timing (pip install -e '.[torch]')")
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = layout.dit_model_config(exp, batch["text"].shape[-1])
    config = {k: v for k, v in dit_map.dit_to_diffusers_config(cfg).items() if not k.startswith("_")}
    model = WanTransformer3DModel(**config)
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(model_state)}
    flat = dit_map.to_diffusers_params(cfg, flat)  # channel concat: one fused patch kernel, as diffusers has it
    weights = {}
    for e in dit_map.dit_entries(cfg):
        x = flat[e.path] if e.layer is None else flat[e.path][e.layer]
        weights[e.name] = torch.from_numpy(to_torch(x, e.layout))
    model.load_state_dict(weights, strict=True)  # same weights; strict: same architecture, parameter for parameter
    model.train()

    opt = exp.dit.optim
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    decay_params = [p for p in params if p.ndim > 1]  # klingjax decays matrices only
    other_params = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay_params, "weight_decay": opt.weight_decay},
                                   {"params": other_params, "weight_decay": 0.0}],
                                  lr=opt.lr, betas=(opt.b1, opt.b2), eps=1e-8)
    x0 = torch.from_numpy(batch["latent"]).permute(0, 4, 1, 2, 3).contiguous()  # (B, C, t, h, w)
    ctx = torch.from_numpy(batch["text"])  # (B, L, text_dim)
    null_ctx = torch.zeros_like(ctx[:1])
    shift, b = layout.train_shift(exp), x0.shape[0]
    state = {"step": 0}

    def step():
        drop = torch.rand(b) < exp.dit.caption_dropout  # (B,)
        text = torch.where(drop[:, None, None], null_ctx, ctx)
        t = torch.sigmoid(torch.randn(b))  # logit-normal, then shifted like klingjax
        t = (shift * t / (1 + (shift - 1) * t)).clamp(1e-5, 1 - 1e-5)
        noise = torch.randn_like(x0)
        tb = t[:, None, None, None, None]
        x_t = (1 - tb) * x0 + tb * noise
        v = model(x_t, t * 1000.0, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
        return torch_update(loss, params, ema, optimizer, opt, state)

    return step


# ---------------------------------------------------------------------------------------------------------
# GPU: MFU of the 1.3B variant at 480p token counts
# ---------------------------------------------------------------------------------------------------------


def gpu_mfu(args, devices) -> tuple[float | None, str]:
    """(MFU, description) of the 1.3B train step on `devices[0]`; MFU None where it could not be measured."""
    kind = devices[0].device_kind
    peak = next((v for k, v in GPU_BF16_PEAK.items() if k in kind), None)
    overrides = {"dtype": jnp.bfloat16, "remat": RematPolicy(args.gpu_remat), "attention_impl": AttentionImpl.CUDNN}
    exp = experiment("1.3B", 1, 81, 480, 832, "wan2.1", overrides)
    batch = make_batch(exp, args.gpu_text_len, 4096)
    cfg = layout.dit_model_config(exp, 4096)
    t, h, w, _ = layout.latent_grid(exp)
    grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    flops = train_flops(cfg, 1, grid, args.gpu_text_len)
    print(f"GPU {kind}: variant {exp.dit.variant}, latents {batch['latent'].shape}, {math.prod(grid)} tokens, "
          f"{args.gpu_text_len} text tokens, bf16 compute, remat {args.gpu_remat}, cuDNN attention; "
          f"{flops / 1e12:.1f} TFLOP per step", flush=True)
    try:
        t0 = time.perf_counter()
        compiled, state, dev_batch, key, st, _, _ = jax_step(exp, batch, devices)
        mem = compiled.memory_analysis()
        print(f"GPU: compiled in {time.perf_counter() - t0:.0f} s; {param_count(st.state):,} params; XLA buffers: "
              f"arguments {mem.argument_size_in_bytes / 2**30:.1f} GiB, temp {mem.temp_size_in_bytes / 2**30:.1f} GiB",
              flush=True)
        times = timed_rounds({"gpu": jax_trainer(compiled, state, dev_batch, key)}, warmup=2, steps=args.gpu_steps)
        sec = float(np.median(times["gpu"]))
    except Exception as err:  # report any failure (OOM, cuDNN) as a not-met goal
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    achieved = flops / sec
    print(f"GPU: {sec:.3f} s per step, {achieved / 1e12:.1f} TFLOP/s model FLOPs", flush=True)
    if peak is None:
        return None, f"{achieved / 1e12:.1f} TFLOP/s on {kind}, no published bf16 peak known"
    return achieved / peak, f"{achieved / 1e12:.1f} of {peak / 1e12:.0f} TFLOP/s, {sec:.3f} s/step on {kind}"


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="S", help="DiT variant for the CPU comparison")
    parser.add_argument("--vae", default="demo", help="VAE variant whose latent grid and channels the DiT sees")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64, help="frame height = width in pixels")
    parser.add_argument("--text_len", type=int, default=16)
    parser.add_argument("--text_dim", type=int, default=384)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median) per framework")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads; XLA's CPU pool uses every schedulable core")
    parser.add_argument("--gpu_steps", type=int, default=5)
    parser.add_argument("--gpu_text_len", type=int, default=512)
    parser.add_argument("--gpu_remat", default="full", choices=[p.value for p in RematPolicy if p.value != "none"])
    parser.add_argument("--host_malloc", default="tcmalloc", choices=["tcmalloc", "system"],
                        help="tcmalloc: re-exec under tcmalloc when installed, as klingjax-train does (both "
                             "frameworks share the process, so both get it); system: glibc malloc")
    args = parser.parse_args()
    if args.host_malloc == "system":
        os.environ["KLINGJAX_HOST_MALLOC"] = "default"
    malloc = host_memory.reexec_with_tcmalloc()  # may restart this process (same argv) under tcmalloc
    # Read when the GPU client starts (first device query): the 1.3B step needs most of the memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

    # --- CPU: klingjax versus diffusers, same device, same threads --------------------------------------------
    cpu = jax.devices("cpu")[:1]
    exp = experiment(args.variant, args.batch, args.frames, args.size, args.size, args.vae)
    batch = make_batch(exp, args.text_len, args.text_dim)
    cfg = layout.dit_model_config(exp, args.text_dim)
    t, h, w, _ = layout.latent_grid(exp)
    grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    tokens = math.prod(grid)
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} schedulable cores (XLA's pool); torch threads "
          f"{args.threads}; host allocator: {malloc}", flush=True)
    print(f"config: variant {args.variant} (dim {cfg.dim}, ffn {cfg.ffn_dim}, heads {cfg.num_heads}, layers "
          f"{cfg.num_layers}, text_dim {cfg.text_dim}), latents {batch['latent'].shape} -> {tokens} tokens/clip, "
          f"text {batch['text'].shape}, fp32", flush=True)

    t0 = time.perf_counter()
    compiled, state, dev_batch, key, st, mesh, rules = jax_step(exp, batch, cpu)
    print(f"klingjax: {param_count(st.state):,} params; train step compiled in {time.perf_counter() - t0:.1f} s",
          flush=True)
    model_state = jax.tree.map(np.array, nnx.state(nnx.merge(st.graphdef, state).model, nnx.Param))  # copies
    fns = {"klingjax": jax_trainer(compiled, state, dev_batch, key)}
    del state  # donated to the step from here on
    torch_step = torch_trainer(exp, model_state, batch, args.threads)
    if torch_step is not None:
        fns["torch"] = torch_step
    big, big_flops = matmul(cpu[0], 2048, 2048, 2048)
    shaped, shaped_flops = matmul(cpu[0], args.batch * tokens, cfg.dim, cfg.ffn_dim)
    fns.update(dot_2048=big, dot_model=shaped)
    # Interleaved rounds: under a varying machine load every contender sees the same conditions.
    times = timed_rounds(fns, warmup=1, steps=args.steps)
    ours = float(np.median(times["klingjax"]))
    theirs = float(np.median(times["torch"])) if "torch" in times else None
    peak = max(big_flops / min(times["dot_2048"]), shaped_flops / min(times["dot_model"]))  # FLOP/s
    print(f"klingjax train step (fwd+bwd+clip+AdamW+EMA): {ours:.3f} s (median of {args.steps}: "
          f"{', '.join(f'{x:.2f}' for x in times['klingjax'])})", flush=True)
    if theirs is not None:
        print(f"diffusers WanTransformer3DModel + torch AdamW step: {theirs:.3f} s (median of {args.steps}: "
              f"{', '.join(f'{x:.2f}' for x in times['torch'])})", flush=True)

    parts = forward_flops(cfg, args.batch, grid, args.text_len)
    flops = train_flops(cfg, args.batch, grid, args.text_len)
    xla = xla_flops(exp, batch, mesh, rules)
    print(f"FLOPs per step: analytic {flops / 1e9:.2f} GFLOP (forward: linear {parts['linear'] / 1e9:.2f}, attention "
          f"{parts['attention'] / 1e9:.2f}, embed {parts['embed'] / 1e9:.3f}); XLA cost analysis {xla / 1e9:.2f} "
          f"GFLOP (all ops)", flush=True)
    big_rate, shaped_rate = big_flops / min(times["dot_2048"]), shaped_flops / min(times["dot_model"])
    print(f"matmul fp32 (best of {args.steps}): 2048^3 {big_rate / 1e9:.1f} GFLOP/s, model-shaped "
          f"{args.batch * tokens}x{cfg.dim}x{cfg.ffn_dim} {shaped_rate / 1e9:.1f} GFLOP/s -> peak {peak / 1e9:.1f}; "
          f"klingjax step achieves {flops / ours / 1e9:.1f} GFLOP/s"
          + (f", torch {flops / theirs / 1e9:.1f} GFLOP/s" if theirs else ""), flush=True)

    # --- GPU: 1.3B MFU ----------------------------------------------------------------------------------------
    gpu_result = None
    if jax.devices()[0].platform == "gpu":
        gpu_result = gpu_mfu(args, jax.devices()[:1])
    else:
        print("GPU MFU not measured: no GPU (jax.devices()[0] is a CPU)")

    # --- Goals ------------------------------------------------------------------------------------------------
    if theirs is None:
        print("GOAL train_step_vs_torch: NOT MEASURED (goal <= 0.7x torch) NOT MET")
    else:
        ratio = ours / theirs
        print(f"GOAL train_step_vs_torch: {ratio:.2f}x torch ({ours:.3f} s vs {theirs:.3f} s) (goal <= 0.7x) "
              f"{'MET' if ratio <= 0.7 else 'NOT MET'}")
    frac = flops / ours / peak
    print(f"GOAL achieved_flops_vs_matmul: {100 * frac:.1f}% ({flops / ours / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s) "
          f"(goal >= 40%) {'MET' if frac >= 0.4 else 'NOT MET'}")
    if gpu_result is None:
        print("GOAL gpu_mfu_1.3b: not measured (no GPU) NOT MET")
    else:
        mfu, what = gpu_result
        if mfu is None:
            print(f"GOAL gpu_mfu_1.3b: not measured ({what}) (goal >= 50%) NOT MET")
        else:
            print(f"GOAL gpu_mfu_1.3b: {100 * mfu:.1f}% ({what}) (goal >= 50%) {'MET' if mfu >= 0.5 else 'NOT MET'}")


if __name__ == "__main__":
    main()
