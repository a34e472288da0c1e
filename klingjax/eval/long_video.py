"""Drift evaluation of long rollouts: extend the first frames of long ground-truth clips for minutes with each
anti-drift method and measure per window (klingjax/eval/drift.py), streaming: no video is held whole.

Every method rolls out the same clips from the same key on the same model, so their curves differ only by the
method. The clips are `bounce.long_clip`s of the work dir's data spec (held-out combos); each rollout starts from
the clip's first `context` latent frames' pixels (1 + tf (context - 1) frames) and its caption.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from klingjax.data.synthetic.bounce import LongClip, long_clip
from klingjax.eval import drift, media
from klingjax.eval.rollout import RolloutConfig, context_pixels, rollout


def truth_clips(spec, seed: int, count: int, seconds: float) -> list[LongClip]:
    """`count` held-out long clips of `seconds` at the spec's fps (deterministic in seed)."""
    return [long_clip(spec, seed, i, round(seconds * spec.fps), split="eval") for i in range(count)]


def evaluate_method(gen, truths: Sequence[LongClip], config: RolloutConfig, *, key: jax.Array, window_s: float = 2.0,
                    video_path: str | None = None, quiet: bool = True, **sample_kwargs) -> dict:
    """Roll out every truth clip (one batch) with `config`; per-clip DriftMeter results and their summary.

    video_path: the first clip's rollout is streamed there as an mp4 (for looking at).
    """
    spec = truths[0].spec
    fps, total = float(spec.fps), truths[0].num_frames
    need = context_pixels(config.context, gen.vae.cfg.temporal_factor)
    start = np.stack([t.frames(0, need) for t in truths])
    meters = [drift.DriftMeter(t, window=max(2, round(window_s * fps)), fps=fps) for t in truths]
    chunks = rollout(gen, [t.caption for t in truths], key, total, start=start, config=config, fps=fps, quiet=quiet,
                     **sample_kwargs)
    with media.mp4_stream(video_path, fps) if video_path else contextlib.nullcontext() as write:
        for frames, seam in chunks:
            for meter, clip in zip(meters, frames):
                meter.update(clip, seam=seam)
            if write is not None:
                write(frames[0])
    results = [m.result() for m in meters]
    return {"results": results, "summary": drift.summarise(results)}


def vae_ceiling(gen, truths: Sequence[LongClip], *, window_s: float = 2.0) -> dict:
    """The ground truth through the VAE alone, clip-length chunk by chunk (each encoded and decoded on its own, a seam
    between): what any DiT's rollout can reach on each metric at best (DriftMeter results and summary)."""
    spec = truths[0].spec
    fps, total = float(spec.fps), truths[0].num_frames
    num_frames = 1 + gen.vae.cfg.temporal_factor * (gen.latent_shape[0] - 1)
    meters = [drift.DriftMeter(t, window=max(2, round(window_s * fps)), fps=fps) for t in truths]
    for start in range(0, total, num_frames):
        stop = min(start + num_frames, total)
        stop -= (stop - start - 1) % gen.vae.cfg.temporal_factor  # a causal VAE takes 1 + tf k frames
        clips = np.stack([t.frames(start, stop) for t in truths])
        recon = gen.decode(gen.encode(clips, batch_size=len(truths)), batch_size=len(truths))
        for meter, clip in zip(meters, recon):
            meter.update(clip, seam=start > 0)
    results = [m.result() for m in meters]
    return {"results": results, "summary": drift.summarise(results)}


def compare(gen, truths: Sequence[LongClip], configs: Sequence[RolloutConfig], *, out_dir: str, seed: int = 0,
            window_s: float = 2.0, **sample_kwargs) -> dict[str, dict]:
    """Every method on the same clips and key: `out_dir`/drift.json (summaries and per-clip results), report.md,
    drift.png and one example rollout per method (<method>.mp4). Returns {method name: summary}, with the VAE's
    ceiling first ("vae (ceiling)": the ground truth encoded and decoded chunk by chunk)."""
    os.makedirs(out_dir, exist_ok=True)
    key = jax.random.key(seed)
    ceiling = vae_ceiling(gen, truths, window_s=window_s)
    out, everything = {"vae (ceiling)": ceiling["summary"]}, {"vae (ceiling)": ceiling}
    for config in configs:
        res = evaluate_method(gen, truths, config, key=key, window_s=window_s, quiet=False,
                              video_path=os.path.join(out_dir, f"{config.name}.mp4"), **sample_kwargs)
        out[config.name] = res["summary"]
        everything[config.name] = res
    with open(os.path.join(out_dir, "drift.json"), "w") as f:
        json.dump(everything, f)
    drift.write_report(out, os.path.join(out_dir, "report.md"))
    drift.plot_curves(out, os.path.join(out_dir, "drift.png"))
    return out
