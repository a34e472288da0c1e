"""VAE benchmark: streaming memory versus clip length, and encode+decode time versus diffusers.

    python benchmarks/vae.py [--variant demo] [--size 64] [--threads 2]

1. Memory for 17, 65 and 129 frames, from XLA's buffer assignment of each compiled program
   (`memory_analysis()`). "Working memory" is the program's temp buffers: everything the device holds while it
   runs except the inputs (params, latents or video) and the output (video or latents), which grow with length
   by nature and are reported separately. Shown for `decode_streaming` (the GOAL), `encode_streaming`, the tiled
   in-jit `decode_tiled` and, for contrast, the full-sequence `decode`.
   The host-driven `vae_tiling.decode_to_host` runs one compiled one-tile program whatever the length and copies
   each chunk's frames to the host: its whole device footprint (params + caches + temp + one chunk) is printed,
   it is run for every length to time it, and (unless --no_hd) its footprint for the real Wan 2.1 VAE decoding
   1080p in 256-pixel tiles is computed by compiling alone (abstract params, nothing allocated).
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
from klingjax.models.vae_tiling import decode_step_memory, decode_tiled, decode_to_host

FRAMES = (17, 65, 129)


def _stats(fn, *args):
    return fn.lower(*args).compile().memory_analysis()


def memory(model: CausalVAE, size: int) -> dict[int, dict[str, float]]:
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    h = size // cfg.spatial_factor
    tile = (h // 2 + 2, h // 2 + 2)  # 2x2 latent tiles overlapping by 4
    programs = {
        "decode_streaming": lambda m, z: m.decode_streaming(z),
        "decode_tiled": lambda m, z: decode_tiled(m, z, tile=tile, overlap=(4, 4)),
        "decode": lambda m, z: m.decode(z),
    }
    out = {}
    for frames in FRAMES:
        t = cfg.latent_shape(frames, size, size)[0]
        z = jax.ShapeDtypeStruct((1, t, h, h, cfg.z_dim), jnp.float32)
        x = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
        row = {}
        for name, fn in programs.items():
            stats = _stats(jax.jit(lambda st, z, fn=fn: fn(nnx.merge(graphdef, st), z)), state, z)
            row[name] = stats.temp_size_in_bytes / 2**20
            row[name + "_out"] = stats.output_size_in_bytes / 2**20
        stats = _stats(jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_streaming(x)), state, x)
        row["encode_streaming"] = stats.temp_size_in_bytes / 2**20
        out[frames] = row
        print(f"{frames:4d} frames at {size}x{size}, working memory (MiB): decode_streaming "
              f"{row['decode_streaming']:6.2f} | decode_tiled {row['decode_tiled']:6.2f} | encode_streaming "
              f"{row['encode_streaming']:6.2f} | full-sequence decode {row['decode']:7.1f} | "
              f"output video {row['decode_out']:5.2f}", flush=True)
    # decode_to_host: one one-tile program for any length; its whole device footprint.
    mem = decode_step_memory(model, (1, h, h, cfg.z_dim))
    print(f"decode_to_host, any length: device footprint {mem['total'] / 2**20:.2f} MiB ("
          + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem.items() if k != "total") + ")", flush=True)
    out["host_footprint"] = mem["total"] / 2**20
    return out


def hd_footprint() -> None:
    """`decode_to_host` of the real Wan 2.1 VAE at 1080p in 256-px tiles: device bytes from compilation alone."""
    for dtype in (jnp.float32, jnp.bfloat16):
        cfg = dataclasses.replace(VAE_VARIANTS["wan2.1"], dtype=dtype)
        vae = nnx.eval_shape(lambda cfg=cfg: CausalVAE(cfg, rngs=nnx.Rngs(0)))  # abstract: nothing allocated
        mem = decode_step_memory(vae, (1, 1080 // 8, 1920 // 8, cfg.z_dim), tile=(32, 32), overlap=(8, 8))
        print(f"decode_to_host wan2.1 {jnp.dtype(dtype).name} 1080p (latents 135x240, tiles 32x32 overlap 8), any "
              f"length: device footprint {mem['total'] / 2**30:.2f} GiB ("
              + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items() if k != "total") + ")", flush=True)


def host_time(model: CausalVAE, size: int) -> None:
    """Wall time of `decode_to_host` (untiled) per length: frames land in a host uint8 array chunk by chunk."""
    h = size // model.cfg.spatial_factor
    for frames in FRAMES:
        t = model.cfg.latent_shape(frames, size, size)[0]
        z = np.random.default_rng(0).standard_normal((1, t, h, h, model.cfg.z_dim)).astype(np.float32)
        buf = np.empty((1, frames, size, size, 3), np.uint8)
        decode_to_host(model, z[:, :2], out=np.empty((1, 5, size, size, 3), np.uint8))  # compile
        t0 = time.perf_counter()
        decode_to_host(model, z, out=buf)
        sec = time.perf_counter() - t0
        print(f"decode_to_host {frames:4d} frames: {sec:.3f} s ({frames / sec:.0f} frames/s)", flush=True)


def _torch_run(cfg, x: np.ndarray, threads: int):
    """diffusers `AutoencoderKLWan` encode (mode) + decode of x as a callable, or None without torch."""
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
    print(f"diffusers: torch {torch.__version__}, {threads} threads", flush=True)

    def run():
        with torch.no_grad():
            z = ref.encode(xt).latent_dist.mode()
            ref.decode(z)

    return run


def encode_decode_times(model: CausalVAE, x: np.ndarray, repeats: int, threads: int) -> dict[str, float]:
    """Median encode+decode seconds of klingjax (streaming, full) and diffusers, timed in interleaved rounds.

    Interleaving (one run of each per round) spreads the load of a shared CPU over all contenders alike.
    """
    graphdef, state = nnx.split(model)
    xj = jnp.asarray(x)
    runs = {}
    for name, enc, dec in (("streaming", "encode_streaming", "decode_streaming"), ("full", "encode", "decode")):
        fn = jax.jit(lambda st, x, enc=enc, dec=dec: getattr(m := nnx.merge(graphdef, st), dec)(getattr(m, enc)(x)[0]))
        runs[name] = lambda fn=fn: fn(state, xj).block_until_ready()
    torch_run = _torch_run(model.cfg, x, threads)
    if torch_run is not None:
        runs["diffusers"] = torch_run
    for run in runs.values():
        run()  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    out = {name: float(np.median(t)) for name, t in times.items()}
    for name, sec in out.items():
        print(f"{name:9s} encode+decode {x.shape[1]} frames: median {sec:.3f} s (min {min(times[name]):.3f} s, "
              f"{repeats} interleaved rounds)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="demo", choices=sorted(VAE_VARIANTS))
    parser.add_argument("--size", type=int, default=64, help="frame height = width in pixels")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_hd", dest="hd", action="store_false", help="skip the Wan 2.1 1080p footprint")
    args = parser.parse_args()
    cfg = dataclasses.replace(VAE_VARIANTS[args.variant])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, variant {args.variant}, "
          f"{args.size}x{args.size}", flush=True)
    model = CausalVAE(cfg, rngs=nnx.Rngs(0))
    mem = memory(model, args.size)
    host_time(model, args.size)
    if args.hd:
        hd_footprint()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 17, args.size, args.size, 3)).astype(np.float32)
    times = encode_decode_times(model, x, args.repeats, args.threads)
    theirs = times.get("diffusers")

    working = [mem[f]["decode_streaming"] for f in FRAMES]
    spread = max(working) / min(working)
    verdict = "MET" if spread <= 1.10 else "NOT MET"
    print(f"GOAL decode_memory_flat_17_65_129: max/min decode_streaming working memory {spread:.3f} "
          f"({', '.join(f'{w:.2f}' for w in working)} MiB, output video excluded) (goal <= 1.10) {verdict}")
    if theirs is None:
        print("GOAL encode_decode_time_vs_diffusers: NOT MEASURED (goal <= 0.8x torch) NOT MET")
    else:
        best = min(times["streaming"], times["full"])
        ratio = best / theirs
        verdict = "MET" if ratio <= 0.8 else "NOT MET"
        print(f"GOAL encode_decode_time_vs_diffusers: {ratio:.2f}x torch ({best:.3f} s vs {theirs:.3f} s) "
              f"(goal <= 0.8x) {verdict}")


if __name__ == "__main__":
    main()
