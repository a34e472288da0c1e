"""VAE train-step benchmark: klingjax's VAE stage step versus diffusers `AutoencoderKLWan` + torch AdamW.

    python benchmarks/vae_step.py [--variant demo] [--batch B] [--frames 9] [--size 32] [--steps 5] [--threads N]
                                  [--no_lpips] [--no_forward] [--quick] [--host_malloc tcmalloc|system]

CPU, same process, same thread count (torch.set_num_threads(--threads); XLA's pool uses every schedulable core).
The experiment is experiments/demo.py's, with --variant/--batch/--frames/--size applied: by default the demo's VAE
(its variant and model overrides, z 16: 1.88M params) on the demo's batch (2) of 9x32x32 clips, the demo's loss
weights and optimiser.

- klingjax runs the train step users run: the "vae" stage's loss (`stages.vae_stage` -> `vae_losses.vae_loss`:
  encode, posterior sample, decode, L1 + mse_weight * MSE + kl_weight * KL, PSNR metric), `create_trainer` +
  `make_train_step` + `compile_train_step` (forward, backward, global-norm clip, AdamW, EMA, step guard), jitted.
- diffusers gets the same config (`vae_map.vae_to_diffusers_config`) and the same weights (through the export
  map, strict `load_state_dict`) and does the same work per step: `encode` -> `latent_dist.sample()` -> `decode`,
  the same L1 + MSE + KL (KL as klingjax: per latent element, batch mean), backward, `clip_grad_norm_`,
  `torch.optim.AdamW` (same peak lr, betas, eps, weight decay on matrices only), zero_grad, EMA lerp.
  Differences in kind, none in cost: diffusers' `decode` always clamps to [-1, 1], klingjax trains on the
  unclamped reconstruction (the clamp is one elementwise op; it only zeroes the gradient where |recon| > 1); torch
  uses the peak lr throughout, klingjax its warmup + cosine schedule (as dit_step.py).

The like-for-like row (the GOAL) is that loss, which is the demo's (the demo trains without LPIPS or a
discriminator). LPIPS is klingjax-only (diffusers has no LPIPS), so it is not in the comparison: unless --no_lpips
a second klingjax step with `vae.loss.lpips_weight=0.1` (AlexNet, all frames) is timed alongside and its
overhead is reported on its own line. Also timed (unless --no_forward), to show where the step goes: the forward
alone (the loss, no gradient) on both sides. --quick shrinks everything for the smoke test
(tests/benchmarks/test_vae_step.py): batch 1, one 32x32 frame, base_dim 8, 1 timed step; its timings mean nothing.

Before timing, the two models reconstruct the same clip through the posterior mean (clamped on both sides) and
their loss at the mean is computed: the max abs differences are printed (the script stops above 1e-3 / 1e-4), so
the timed work is the same function.
Every contender runs in interleaved rounds (1 warm-up round, --steps timed) so all see the same machine load;
medians. As in dit_step.py the process re-executes itself under tcmalloc when installed (--host_malloc).

Ends with one `GOAL` line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import dit_step  # benchmarks/dit_step.py: interleaved timing, the jitted-step closure, the CPU name
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from klingjax import layout
from klingjax.config import ExperimentConfig, to_experiment
from klingjax.export import vae_map
from klingjax.export.param_map import to_torch
from klingjax.models.lpips import LPIPS_MIN_SIZE
from klingjax.models.vae import CausalVAE, kl_divergence
from klingjax.sharding.mesh import make_mesh
from klingjax.sharding.rules import get_rules
from klingjax.train import host_memory, stages
from klingjax.train.batch import video_batch
from klingjax.train.optim import make_optimizer
from klingjax.train.state import create_trainer, param_count
from klingjax.train.step import LossContext, batch_sharding, compile_train_step, make_train_step

GOAL_RATIO = 0.7  # klingjax step time / torch step time
LPIPS_WEIGHT = 0.1  # any positive weight costs the same; the demo trains without LPIPS
# --quick, the smoke test's sizes: one frame (a 5-frame clip adds ~5 s of compile), base_dim 8
QUICK = {"batch": 1, "frames": 1, "size": 32, "steps": 1, "base_dim": 8}


# ---------------------------------------------------------------------------------------------------------
# Config and data
# ---------------------------------------------------------------------------------------------------------


def experiment(variant: str, batch: int, frames: int, size: int, lpips_weight: float = 0.0,
               overrides: dict | None = None) -> ExperimentConfig:
    """experiments/demo.py's experiment, its VAE stage resized (LPIPS weight set: 0 is the demo's)."""
    from experiments import demo

    c = demo.get_config()
    c.data.num_frames, c.data.height, c.data.width = frames, size, size
    if variant != c.vae.variant:  # another variant: the demo's overrides (z_dim ...) were meant for the demo's
        c.vae.model_overrides = {}
    c.vae.variant, c.vae.sharding = variant, "dp"
    c.vae.batch_size = batch or c.vae.batch_size
    c.vae.model_overrides = {**c.vae.model_overrides, **(overrides or {})}
    c.vae.loss.lpips_weight = lpips_weight
    c.eval.fvd = False  # I3D's 9-frame minimum would reject short clips; eval plays no part here
    return to_experiment(c)


def make_video(exp: ExperimentConfig) -> np.ndarray:
    """A random batch of clips (B, T, H, W, 3) in [-1, 1]."""
    d = exp.data
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (exp.vae.batch_size, d.num_frames, d.height, d.width, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# klingjax: the "vae" stage's train step
# ---------------------------------------------------------------------------------------------------------


def jax_step(exp: ExperimentConfig, video: np.ndarray, device: jax.Device, *, with_forward: bool = True):
    """(train step closure, forward-only closure or None, trainer, model params as numpy) for the vae stage.

    Both closures return the loss; the step threads its (donated) state through, the forward reads the initial one.
    """
    spec = stages.vae_stage(exp, workdir="")
    cfg = exp.vae
    mesh = make_mesh((-1, 1, 1, 1), devices=[device])
    rules = get_rules(cfg.sharding, "vae")
    st = create_trainer(spec.make_model, make_optimizer(cfg.optim, cfg.steps), mesh, rules, exp.seed)
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen = jax.device_put(spec.frozen(), replicated) if spec.frozen else None
    extra = () if frozen is None else (frozen,)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(st.graphdef, spec.loss_fn, ema_decay=cfg.optim.ema_decay, frozen=bool(extra))
        step_fn = compile_train_step(train_step, st.shardings, mesh, frozen=bool(extra))
        batch = jax.device_put(video_batch({"video": video}), batch_sharding(mesh))
        key = jax.device_put(jax.random.key(exp.seed), device)
        compiled = step_fn.lower(st.state, batch, key, *extra).compile()

        def loss_only(state, batch, key, *frozen_args):  # the forward alone: the loss, no gradient, no update
            trainer = nnx.merge(st.graphdef, state)
            ctx = LossContext(trainer.optimizer.step[...], frozen_args[0] if frozen_args else None)
            return spec.loss_fn(trainer.model, batch, key, ctx)[0]

        forward = jax.jit(loss_only).lower(st.state, batch, key, *extra).compile() if with_forward else None
    model_state = jax.tree.map(np.array, nnx.state(nnx.merge(st.graphdef, st.state).model, nnx.Param))  # copies
    run_forward = None
    if forward is not None:
        initial = jax.tree.map(jnp.copy, st.state)  # the forward's own copy: the step donates (deletes) st.state
        run_forward = lambda: jax.block_until_ready(forward(initial, batch, key, *extra))
    step = dit_step.jax_trainer(lambda s, b, k: compiled(s, b, k, *extra), st.state, batch, key)
    return step, run_forward, st, model_state


# ---------------------------------------------------------------------------------------------------------
# diffusers + torch AdamW, same config and weights
# ---------------------------------------------------------------------------------------------------------


def torch_model(cfg, model_state: nnx.State, threads: int):
    """diffusers `AutoencoderKLWan` of `cfg` holding `model_state`'s weights (strict load), or None without torch."""
    try:
        import torch
        from diffusers import AutoencoderKLWan
    except ImportError:
        print("torch/diffusers not importable: skipping the diffusers timing (pip install -e '.[torch]')")
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = {k: v for k, v in vae_map.vae_to_diffusers_config(cfg).items() if not k.startswith("_")}
    model = AutoencoderKLWan(**config)
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(model_state)}
    weights = {e.name: torch.from_numpy(to_torch(flat[e.path], e.layout)) for e in vae_map.vae_entries(cfg)}
    model.load_state_dict(weights, strict=True)  # same weights; strict: same architecture, parameter for parameter
    return model


def torch_loss(model, x, loss_cfg, *, sample: bool):
    """(loss, recon (B, C, T, H, W)): encode -> sample (or mean) -> decode, L1 + mse_w * MSE + kl_w * KL."""
    post = model.encode(x).latent_dist
    z = post.sample() if sample else post.mode()
    recon = model.decode(z).sample  # clamped to [-1, 1] by diffusers
    err = recon - x
    kl = 0.5 * (post.mean.square() + post.var - 1.0 - post.logvar)  # (B, z, t, h, w)
    kl = kl.flatten(1).sum(1).mean() / kl[0].numel()  # per latent element, as vae_losses
    loss = err.abs().mean() + loss_cfg.mse_weight * err.square().mean() + loss_cfg.kl_weight * kl
    return loss, recon


def torch_trainer(exp: ExperimentConfig, model, video: np.ndarray) -> tuple[Callable[[], float], Callable[[], float]]:
    """(train step closure, forward-only closure) of diffusers `model` doing the klingjax step's work."""
    import torch

    model.train()
    opt = exp.vae.optim
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": opt.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=opt.lr, betas=(opt.b1, opt.b2), eps=1e-8)  # klingjax decays matrices only
    x = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()  # (B, T, H, W, C) -> (B, C, T, H, W)
    state = {"step": 0}

    def step() -> float:
        loss, _ = torch_loss(model, x, exp.vae.loss, sample=True)
        return dit_step.torch_update(loss, params, ema, optimizer, opt, state)

    def forward() -> float:
        with torch.no_grad():
            return torch_loss(model, x, exp.vae.loss, sample=True)[0].item()

    return step, forward


def check_same_function(exp: ExperimentConfig, model_state: nnx.State, model, video: np.ndarray) -> tuple[float, float]:
    """(max abs diff of the reconstructions through the posterior mean, abs diff of the loss there), initial weights."""
    import torch

    cfg, loss_cfg = layout.vae_config(exp), exp.vae.loss
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0))))

    def ours(params, x):
        vae = nnx.merge(graphdef, params)
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean, clip=True)  # (B, T, H, W, 3), clamped like diffusers' decode
        err = recon - x
        kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(mean.shape[1:])
        return recon, jnp.mean(jnp.abs(err)) + loss_cfg.mse_weight * jnp.mean(err**2) + loss_cfg.kl_weight * kl

    with jax.default_matmul_precision("highest"):
        recon, loss = jax.jit(ours)(model_state, jnp.asarray(video))
    model.eval()
    with torch.no_grad():
        want_loss, want = torch_loss(model, torch.from_numpy(video).permute(0, 4, 1, 2, 3), loss_cfg, sample=False)
    want = want.permute(0, 2, 3, 4, 1).numpy()  # (B, C, T, H, W) -> (B, T, H, W, C)
    return float(np.abs(np.asarray(recon) - want).max()), abs(float(loss) - float(want_loss))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def median(times: list[float]) -> str:
    """'0.123 s (median of 5: 0.12, ...)'."""
    return f"{float(np.median(times)):.3f} s (median of {len(times)}: {', '.join(f'{x:.3f}' for x in times)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="demo", help="VAE variant (klingjax.models.vae.VAE_VARIANTS)")
    parser.add_argument("--batch", type=int, default=0, help="clips per step; 0: the demo's vae.batch_size")
    parser.add_argument("--frames", type=int, default=9, help="clip length, 1 + 4k")
    parser.add_argument("--size", type=int, default=32, help="frame height = width in pixels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median) per contender")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads; XLA's CPU pool uses every schedulable core")
    parser.add_argument("--no_lpips", action="store_true", help="skip the klingjax LPIPS-overhead line")
    parser.add_argument("--no_forward", action="store_true", help="skip the forward-only lines (one compile less)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes for the smoke test: {QUICK} (overrides the size flags)")
    parser.add_argument("--host_malloc", default="tcmalloc", choices=["tcmalloc", "system"],
                        help="tcmalloc: re-exec under tcmalloc when installed, as klingjax-train does (both "
                             "frameworks share the process, so both get it); system: glibc malloc")
    args = parser.parse_args()
    overrides = {}
    if args.quick:
        args.batch, args.frames, args.size, args.steps = (QUICK[k] for k in ("batch", "frames", "size", "steps"))
        overrides = {"base_dim": QUICK["base_dim"]}
    if args.host_malloc == "system":
        os.environ["KLINGJAX_HOST_MALLOC"] = "default"
    malloc = host_memory.reexec_with_tcmalloc()  # may restart this process (same argv) under tcmalloc

    device = jax.devices("cpu")[0]
    exp = experiment(args.variant, args.batch, args.frames, args.size, overrides=overrides)
    args.batch = exp.vae.batch_size
    cfg, loss = layout.vae_config(exp), exp.vae.loss
    video = make_video(exp)
    print(f"CPU: {dit_step.cpu_name()}, {len(os.sched_getaffinity(0))} schedulable cores (XLA's pool); torch threads "
          f"{args.threads}; host allocator: {malloc}", flush=True)
    print(f"config: VAE {args.variant} (base_dim {cfg.base_dim}, z_dim {cfg.z_dim}, dim_mult {cfg.dim_mult}, "
          f"res blocks {cfg.num_res_blocks}), video {video.shape} -> latents "
          f"{(args.batch, *cfg.latent_shape(args.frames, args.size, args.size), cfg.z_dim)}, fp32; loss L1 + "
          f"{loss.mse_weight:g} MSE + {loss.kl_weight:g} KL (the demo's), AdamW lr {exp.vae.optim.lr:g}, "
          f"clip {exp.vae.optim.grad_clip:g}, EMA {exp.vae.optim.ema_decay:g}", flush=True)

    t0 = time.perf_counter()
    step, forward, st, model_state = jax_step(exp, video, device, with_forward=not args.no_forward)
    what = "train step" if args.no_forward else "train step + forward"
    print(f"klingjax: {param_count(st.state):,} params; {what} compiled in {time.perf_counter() - t0:.1f} s",
          flush=True)
    fns = {"klingjax": step}

    t0 = time.perf_counter()
    ref = torch_model(cfg, model_state, args.threads)
    if ref is not None:
        n_ref = sum(p.numel() for p in ref.parameters())
        d_recon, d_loss = check_same_function(exp, model_state, ref, video)
        print(f"same function: diffusers {n_ref:,} params; reconstruction through the posterior mean, max abs diff "
              f"{d_recon:.2e}; loss there, abs diff {d_loss:.2e} (loaded and checked in "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
        if d_recon > 1e-3 or d_loss > 1e-4:
            raise RuntimeError(f"klingjax and diffusers compute different functions ({d_recon:.2e}, {d_loss:.2e})")
        fns["torch"], torch_forward = torch_trainer(exp, ref, video)
    if not args.no_forward:
        fns["klingjax_forward"] = forward
        if ref is not None:
            fns["torch_forward"] = torch_forward

    if not args.no_lpips and args.size < LPIPS_MIN_SIZE[loss.lpips_net]:
        print(f"LPIPS line skipped: {loss.lpips_net.value} LPIPS needs frames of at least "
              f"{LPIPS_MIN_SIZE[loss.lpips_net]} px", flush=True)
    elif not args.no_lpips:
        lpips_exp = experiment(args.variant, args.batch, args.frames, args.size, LPIPS_WEIGHT, overrides)
        t0 = time.perf_counter()
        fns["klingjax_lpips"] = jax_step(lpips_exp, video, device, with_forward=False)[0]
        print(f"klingjax with LPIPS ({lpips_exp.vae.loss.lpips_net.value}, weight {LPIPS_WEIGHT:g}, all frames): "
              f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)

    # Interleaved rounds: under a varying machine load every contender sees the same conditions.
    times = dit_step.timed_rounds(fns, warmup=1, steps=args.steps)
    med = {name: float(np.median(t)) for name, t in times.items()}
    rows = {
        "klingjax": "klingjax VAE train step (fwd+bwd+clip+AdamW+EMA)",
        "torch": "diffusers AutoencoderKLWan + torch AdamW step",
        "klingjax_forward": "klingjax forward only (loss, no gradient)",
        "torch_forward": "diffusers forward only (loss, no_grad)",
        "klingjax_lpips": f"klingjax train step + LPIPS (weight {LPIPS_WEIGHT:g}; klingjax only)",
    }
    for name, what in rows.items():
        if name in times:
            print(f"{what}: {median(times[name])}", flush=True)
    ours = med["klingjax"]
    shares = []
    if "klingjax_forward" in med:
        shares.append(f"klingjax forward {100 * med['klingjax_forward'] / ours:.0f}% of its step")
    if "torch_forward" in med:
        shares.append(f"torch forward {100 * med['torch_forward'] / med['torch']:.0f}% of its step")
    if "klingjax_lpips" in med:
        shares.append(f"LPIPS adds {med['klingjax_lpips'] - ours:.3f} s "
                      f"({100 * (med['klingjax_lpips'] / ours - 1):+.0f}%) to the klingjax step")
    if shares:
        print("where the time goes: " + "; ".join(shares), flush=True)

    if "torch" not in med:
        print(f"GOAL vae_step_vs_torch: NOT MEASURED (goal <= {GOAL_RATIO:g}x torch) NOT MET")
    else:
        theirs = med["torch"]
        ratio = ours / theirs
        print(f"GOAL vae_step_vs_torch: {ratio:.2f}x torch ({ours:.3f} s vs {theirs:.3f} s) (goal <= {GOAL_RATIO:g}x) "
              f"{'MET' if ratio <= GOAL_RATIO else 'NOT MET'}")


if __name__ == "__main__":
    main()
