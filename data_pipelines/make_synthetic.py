"""Write the synthetic moving-sprite dataset to ArrayRecord shards (train + held-out eval) and a manifest.

    python -m data_pipelines.make_synthetic --output /tmp/synth --num_train 2000 --num_eval 200 --seed 0

Writes DIR/train-NNNNN-of-MMMMM.array_record, DIR/eval-..., and DIR/manifest.json last (its presence
means the dataset is complete). Records follow the video schema of `klingjax.data.records`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

from absl import app, flags, logging

from klingjax.data.records import list_shards, make_video_record, write_shards
from klingjax.data.synthetic import SyntheticSpec, generate_split, heldout_combos
from klingjax.data.video_io import encode_mp4

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _records(spec: SyntheticSpec, seed: int, split: str, n: int, codec: str) -> Iterator[dict]:
    for clip in generate_split(spec, seed, split, n):
        video = clip.frames if codec == "raw" else encode_mp4(clip.frames, spec.fps)
        yield make_video_record(video, codec=codec, caption=clip.caption, fps=spec.fps, num_frames=spec.num_frames,
                                height=spec.height, width=spec.width, meta=clip.meta)


def write_synthetic_dataset(out_dir: str, spec: SyntheticSpec, seed: int, num_train: int, num_eval: int,
                            num_shards: int, *, codec: str = "raw", reuse: bool = True) -> dict:
    """Generate and shard both splits into `out_dir`; returns the manifest (reused if an identical one exists)."""
    manifest = {
        "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "seed": seed, "codec": codec,
        "num_train": num_train, "num_eval": num_eval, "num_shards": num_shards,
        "heldout_combos": sorted(list(c) for c in heldout_combos(spec)),
    }
    path = os.path.join(out_dir, MANIFEST)
    if reuse and os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in manifest} == json.loads(json.dumps(manifest)):
            logging.info("reusing synthetic dataset in %s", out_dir)
            return existing
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path):
        os.remove(path)  # the manifest marks completeness: drop it before rewriting shards
    for split, n in (("train", num_train), ("eval", num_eval)):
        for stale in list_shards(out_dir, split):
            os.remove(stale)
        shards = write_shards(_records(spec, seed, split, n, codec), out_dir, split, max(1, min(num_shards, n)))
        manifest[f"{split}_shards"] = [os.path.basename(p) for p in shards]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, path)
    logging.info("wrote synthetic dataset (%d train, %d eval clips) to %s", num_train, num_eval, out_dir)
    return manifest


def shard_paths(out_dir: str, manifest: dict, split: str) -> list[str]:
    """Absolute shard paths of `split` listed in a manifest."""
    return [os.path.join(out_dir, name) for name in manifest[f"{split}_shards"]]


def _define_flags() -> dict[str, flags.FlagHolder]:
    # Defined only when run as a script, so importing write_synthetic_dataset registers no global flags.
    return {
        "output": flags.DEFINE_string("output", None, "Output directory.", required=True),
        "num_train": flags.DEFINE_integer("num_train", 2000, "Number of training clips."),
        "num_eval": flags.DEFINE_integer("num_eval", 200, "Number of held-out eval clips."),
        "seed": flags.DEFINE_integer("seed", 0, "Generator seed."),
        "num_frames": flags.DEFINE_integer("num_frames", 17, "Frames per clip."),
        "height": flags.DEFINE_integer("height", 32, "Frame height."),
        "width": flags.DEFINE_integer("width", 32, "Frame width."),
        "num_shards": flags.DEFINE_integer("num_shards", 4, "Shards per split."),
        "p_two_objects": flags.DEFINE_float("p_two_objects", 0.0, "Probability of a second object."),
        "p_camera_pan": flags.DEFINE_float("p_camera_pan", 0.0, "Probability of a camera pan."),
        "codec": flags.DEFINE_enum("codec", "raw", ["raw", "mp4"], "Store raw uint8 frames or mp4 bytes."),
    }


def main(argv, fl: dict[str, flags.FlagHolder]):
    """CLI entry: build the spec from flags and write the dataset."""
    del argv
    v = {k: h.value for k, h in fl.items()}
    spec = dataclasses.replace(SyntheticSpec(), num_frames=v["num_frames"], height=v["height"], width=v["width"],
                               p_two_objects=v["p_two_objects"], p_camera_pan=v["p_camera_pan"])
    write_synthetic_dataset(v["output"], spec, v["seed"], v["num_train"], v["num_eval"], v["num_shards"],
                            codec=v["codec"], reuse=False)


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
