"""VAE benchmark: streaming-decode memory versus clip length, and encode+decode time versus diffusers.

    python benchmarks/vae.py [--variant demo] [--size 64] [--threads 2]

1. Peak memory of `decode_streaming` for 17, 65 and 129 frames, from XLA's buffer assignment of the compiled
   program (`memory_analysis()`): working memory = temp buffers; the output video itself (which must grow with
   length) is reported separately. The full-sequence `decode` is shown for contrast.
2. Encode + decode wall time of one 17-frame clip: klingjax (jit, streaming and full paths) versus diffusers
   `AutoencoderKLWan` with the same config on the same CPU (same thread count), when torch + diffusers are
   importable (`pip install -e ".[torch]"`); otherwise that goal reports NOT MEASURED.

Ends with one `GOAL` line per goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.models.vae import VAE_VARIANTS, CausalVAE

FRAMES = (17, 65, 129)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memory(model: CausalVAE, size: int) -> dict[int, dict[str, float]]:
    graphdef, state = nnx.split(model)
    out = {}
    for frames in FRAMES:
        t = model.cfg.latent_shape(frames, size, size)[0]
        h = size // model.cfg.spatial_factor
        z = jax.ShapeDtypeStruct((1, t, h, h, model.cfg.z_dim), jnp.float32)
        row = {}
        for name in ("decode_streaming", "decode"):
            fn = jax.jit(lambda st, z, name=name: getattr(nnx.merge(graphdef, st), name)(z))
            stats = fn.lower(state, z).compile().memory_analysis()
            row[name] = stats.temp_size_in_bytes / 2**20
            row[name + "_out"] = stats.output_size_in_bytes / 2**20
        out[frames] = row
        print(f"decode {frames:4d} frames at {size}x{size}: streaming working memory {row['decode_streaming']:8.1f} MiB"
              f" | full-sequence {row['decode']:8.1f} MiB | output video {row['decode_out']:6.1f} MiB", flush=True)
    return out


def jax_time(model: CausalVAE, x: np.ndarray, repeats: int) -> dict[str, float]:
    graphdef, state = nnx.split(model)
    res = {}
    xj = jnp.asarray(x)
    for name, enc, dec in (("streaming", "encode_streaming", "decode_streaming"), ("full", "encode", "decode")):
        fn = jax.jit(lambda st, x, enc=enc, dec=dec: getattr(m := nnx.merge(graphdef, st), dec)(getattr(m, enc)(x)[0]))
        fn(state, xj).block_until_ready()  # compile + warm up
        res[name] = _median_time(lambda fn=fn: fn(state, xj).block_until_ready(), repeats)
        print(f"klingjax {name:9s} encode+decode 17 frames: {res[name]:.3f} s", flush=True)
    return res


def torch_time(cfg, x: np.ndarray, repeats: int, threads: int) -> float | None:
    try:
        import torch
        from diffusers import AutoencoderKLWan
    except ImportError:
        print("torch/diffusers not importable: skipping the diffusers timing (pip install -e '.[torch]')")
        return None
    torch.set_num_threads(threads)
    ref = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
                           temperal_downsample=list(cfg.temporal_downsample), dropout=0.0).eval()
    xt = torch.tensor(x).permute(0, 4, 1, 2, 3).contiguous()  # (B, C, T, H, W)

    def run():
        with torch.no_grad():
            z = ref.encode(xt).latent_dist.mode()
            ref.decode(z)

    run()  # warm up
    sec = _median_time(run, repeats)
    print(f"diffusers AutoencoderKLWan encode+decode 17 frames: {sec:.3f} s (torch {torch.__version__}, "
          f"{threads} threads)", flush=True)
    return sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="demo", choices=sorted(VAE_VARIANTS))
    parser.add_argument("--size", type=int, default=64, help="frame height = width in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = dataclasses.replace(VAE_VARIANTS[args.variant])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, variant {args.variant}, "
          f"{args.size}x{args.size}", flush=True)
    model = CausalVAE(cfg, rngs=nnx.Rngs(0))
    mem = memory(model, args.size)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 17, args.size, args.size, 3)).astype(np.float32)
    ours = jax_time(model, x, args.repeats)
    theirs = torch_time(cfg, x, args.repeats, args.threads)

    working = [mem[f]["decode_streaming"] for f in FRAMES]
    spread = max(working) / min(working)
    verdict = "MET" if spread <= 1.10 else "NOT MET"
    print(f"GOAL decode_memory_flat_17_65_129: max/min working memory {spread:.3f} "
          f"({', '.join(f'{w:.1f}' for w in working)} MiB) (goal <= 1.10) {verdict}")
    if theirs is None:
        print("GOAL encode_decode_time_vs_diffusers: NOT MEASURED (goal <= 0.8x torch) NOT MET")
    else:
        best = min(ours.values())
        ratio = best / theirs
        verdict = "MET" if ratio <= 0.8 else "NOT MET"
        print(f"GOAL encode_decode_time_vs_diffusers: {ratio:.2f}x torch ({best:.3f} s vs {theirs:.3f} s) "
              f"(goal <= 0.8x) {verdict}")


if __name__ == "__main__":
    main()
