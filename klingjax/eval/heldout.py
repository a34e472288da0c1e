"""Held-out clips of a synthetic dataset: the reference of every evaluation (in-loop, `klingjax-eval`, task card)."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from klingjax.config import ExperimentConfig
from klingjax.data.pipeline import decode_video_record, make_dataset
from klingjax.data.records import list_shards
from klingjax.data.synthetic import SyntheticSpec


def load_eval_clips(exp: ExperimentConfig, data_dir: str, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """The first `n` held-out clips in file order: uint8 videos (n, T, H, W, 3), captions, metadata."""
    d = exp.data
    return load_heldout_clips(data_dir, n, num_frames=d.num_frames, height=d.height, width=d.width)


def load_heldout_clips(data_dir: str, n: int, *, num_frames: int, height: int,
                       width: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """The first `n` clips of `data_dir`'s eval split in file order, decoded to (n, num_frames, height, width, 3)."""
    decode = functools.partial(decode_video_record, num_frames=num_frames, height=height, width=width)
    ds = make_dataset(list_shards(data_dir, "eval"), decode=decode, batch_size=min(n, 64), seed=0, shuffle=False,
                      num_epochs=1, drop_remainder=False)
    videos, captions, metas = [], [], []
    for batch in ds:
        videos.append(np.round((np.asarray(batch["video"]) + 1.0) * 127.5).astype(np.uint8))
        captions += [str(c) for c in batch["caption"]]
        metas += [json.loads(m) for m in batch["meta_json"]]
        if len(captions) >= n:
            break
    if not captions:
        raise ValueError(f"no eval clips found in {data_dir}")
    return np.concatenate(videos)[:n], captions[:n], metas[:n]


def synthetic_spec(data_dir: str) -> SyntheticSpec:
    """The generator spec recorded in the dataset's manifest (adherence needs its vocabularies)."""
    with open(os.path.join(data_dir, "manifest.json")) as f:
        return SyntheticSpec.from_dict(json.load(f)["spec"])


def load_dataset_clips(data_dir: str, n: int) -> tuple[np.ndarray, list[str], list[dict], object]:
    """First `n` held-out clips of a synthetic dataset dir: uint8 (n, T, H, W, 3), captions, metas, spec."""
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        raise FileNotFoundError(f"{data_dir} has no manifest.json; is it a dataset written by make_synthetic?")
    spec = synthetic_spec(data_dir)
    videos, captions, metas = load_heldout_clips(data_dir, n, num_frames=spec.num_frames, height=spec.height,
                                                 width=spec.width)
    return videos, captions, metas, spec
