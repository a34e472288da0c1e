"""Encode a video dataset with the trained VAE and text encoder into latent ArrayRecord shards.

    python -m data_pipelines.cache_latents --config experiments/demo.py --workdir /tmp/demo

Each latent record holds `latent` (t, h, w, c) float32 (the VAE posterior mean of the whole clip),
`frame_latent` (t, h, w, c) float32 (latent frame j = the encoding of pixel key frame j alone, what a last-frame /
keyframe / suffix condition is at generation time: `klingjax.data.tasks.key_frame`), `text` (L, D) float16
and `text_mask` (L,) of the caption, plus `caption` and `meta_json`. Every process encodes its own
slice of the dataset and writes its own shards; per-channel latent statistics (for normalisation) are
reduced over all processes and written to `latent_stats.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from klingjax import layout
from klingjax.config import ExperimentConfig, to_experiment
from klingjax.data.pipeline import decode_video_record, make_dataset
from klingjax.data.records import list_shards, write_shards
from klingjax.data.tasks import key_frame


def _encode_fn(vae: nnx.Module):
    graphdef = nnx.graphdef(vae)

    @jax.jit
    def encode(state, video):
        mean, _ = nnx.merge(graphdef, state).encode_streaming(video)  # (B, t, h, w, c)
        return mean

    return functools.partial(encode, nnx.state(vae))


def encode_key_frames(encode, video: np.ndarray, temporal_factor: int) -> np.ndarray:
    """(B, T, H, W, 3) -> (B, t, h, w, c): latent frame j = `encode` of pixel key frame j alone (a 1-frame clip)."""
    b, frames = video.shape[:2]
    keys = [key_frame(j, temporal_factor) for j in range(1 + (frames - 1) // temporal_factor)]
    singles = video[:, keys].reshape(b * len(keys), 1, *video.shape[2:])  # (B*t, 1, H, W, 3)
    z = np.asarray(encode(jnp.asarray(singles)))  # (B*t, 1, h, w, c)
    return z.reshape(b, len(keys), *z.shape[2:])


def _latent_records(exp: ExperimentConfig, workdir: str, split: str, vae, text_encoder, batch_size: int,
                    sums: dict) -> Iterator[dict]:
    d = exp.data
    decode = functools.partial(decode_video_record, num_frames=d.num_frames, height=d.height, width=d.width)
    ds = make_dataset(list_shards(layout.data_dir(exp, workdir), split), decode=decode, batch_size=batch_size,
                      seed=0, shuffle=False, num_epochs=1, process_index=jax.process_index(),
                      process_count=jax.process_count(), drop_remainder=False)
    encode = _encode_fn(vae)
    for batch in ds:
        n = len(batch["caption"])
        video = np.asarray(batch["video"])
        if n < batch_size:  # pad the last batch: one compiled shape
            video = np.concatenate([video, np.repeat(video[-1:], batch_size - n, axis=0)])
        latents = np.asarray(encode(jnp.asarray(video)))[:n]  # (n, t, h, w, c)
        frame_latents = encode_key_frames(encode, video, vae.cfg.temporal_factor)[:n]  # (n, t, h, w, c)
        captions = [str(c) for c in batch["caption"]]
        ctx, mask = text_encoder.encode(captions, exp.text_max_len)
        ctx, mask = np.asarray(ctx), np.asarray(mask)
        if split == "train":
            flat = latents.reshape(-1, latents.shape[-1]).astype(np.float64)  # (n*t*h*w, c)
            sums["n"] += flat.shape[0]
            sums["s"] += flat.sum(0)
            sums["ss"] += np.square(flat).sum(0)
        for i in range(n):
            yield {"latent": latents[i].astype(np.float32), "frame_latent": frame_latents[i].astype(np.float32),
                   "text": ctx[i].astype(np.float16),
                   "text_mask": mask[i].astype(bool), "caption": captions[i], "meta_json": batch["meta_json"][i]}


def cache_latents(exp: ExperimentConfig, workdir: str, vae: nnx.Module, text_encoder, *, batch_size: int = 16,
                  num_shards: int = 2) -> dict:
    """Write `workdir/latents/{train,eval}-*` shards and `latent_stats.json`; returns the stats."""
    out = layout.latent_dir(workdir)
    stats_path = os.path.join(out, "latent_stats.json")
    text_key = {"text_encoder": exp.text_encoder, "text_max_len": exp.text_max_len}
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            cached = json.load(f)
        found = {k: cached.get(k, default) for k, default in (("text_encoder", "minilm"), ("text_max_len", None))}
        if found["text_max_len"] is not None and found != text_key:
            raise ValueError(f"{out} holds text features of {found}, but the config asks for {text_key} "
                             f"(config keys 'text_encoder' / 'text_max_len'): use a new workdir or delete {out}")
        logging.info("cache: reusing %s", out)
        return cached
    os.makedirs(out, exist_ok=True)
    c = vae.cfg.z_dim
    sums = {"n": 0, "s": np.zeros(c), "ss": np.zeros(c)}
    proc, count = jax.process_index(), jax.process_count()
    for split in ("train", "eval"):
        records = _latent_records(exp, workdir, split, vae, text_encoder, batch_size, sums)
        write_shards(records, out, split, num_shards, shard_offset=proc * num_shards, total_shards=count * num_shards)
    # Reduce the moment sums over processes, then normalise per channel.
    local = np.concatenate([[sums["n"]], sums["s"], sums["ss"]])[None]  # (1, 1 + 2c)
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 1 + 2 * c).sum(0)
    n, s, ss = total[0], total[1:1 + c], total[1 + c:]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 1e-12))
    stats = {"mean": mean.tolist(), "std": std.tolist(), "num_latent_vectors": int(n), **text_key}
    if exp.vae.from_workdir:  # a DiT trained over that VAE normalised its latents with that work dir's statistics
        base_mean, base_std = layout.load_latent_stats(exp.vae.from_workdir)
        stats.update(mean=base_mean.tolist(), std=base_std.tolist(), from_workdir=exp.vae.from_workdir,
                     own_mean=mean.tolist(), own_std=std.tolist())
    multihost_utils.sync_global_devices("cache_latents_written")
    if proc == 0:
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp, stats_path)  # written last: its presence means the cache is complete
    logging.info("cache: wrote latents to %s (per-channel std %s)", out, np.round(std, 3))
    return stats


def main(argv):
    del argv
    from klingjax.train.experiment import run_experiment

    exp = to_experiment(flags.FLAGS.config)
    run_experiment(dataclasses.replace(exp, stages=("cache",)), flags.FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a script, so importing this module registers none.
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Experiment work directory (holds data/ and vae/).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
