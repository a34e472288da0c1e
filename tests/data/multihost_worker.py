"""One process of tests/data/test_multihost_data.py: joins a JAX job on 127.0.0.1 and reads one epoch per mode.

    python tests/data/multihost_worker.py --port P --process_id I --num_processes 2 --data_dir D --out OUT.json

Modes: "plain" (no buckets), "per_host" (records split between hosts, then bucketed) and "shared" (every
host buckets the global stream and decodes its slice of each global batch). For every batch it writes
the clip ids, the array shape and the frame numbers encoded in the pixels, plus the failure count.
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def _frame_numbers(video) -> list[list[int]]:
    """Frame numbers from the green channel (frame * 8) of (B, T, H, W, 3) videos in [-1, 1]."""
    import numpy as np

    g = (np.asarray(video)[:, :, 0, 0, 1] + 1.0) * 127.5  # (B, T)
    return np.round(g / 8).astype(int).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("port", "process_id", "num_processes"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    from klingjax.data.buckets import BucketSpec
    from klingjax.data.pipeline import VideoDecoder, make_dataset, num_decode_failures

    paths = sorted(glob.glob(os.path.join(args.data_dir, "*.array_record")))
    modes = {
        "plain": None,
        "per_host": BucketSpec(bases=(16,), durations=(1, 5, 9), same_shape_across_hosts=False),
        "shared": BucketSpec(bases=(16,), durations=(1, 5, 9), same_shape_across_hosts=True),
    }
    result = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    for mode, spec in modes.items():
        ds = make_dataset(paths, decode=VideoDecoder(5, 16, 16, target_fps=8), batch_size=2, seed=3, shuffle=True,
                          num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count(),
                          drop_remainder=False, buckets=spec)
        it = iter(ds)
        batches = [{"ids": [json.loads(m)["id"] for m in b["meta_json"]], "shape": list(b["video"].shape),
                    "frames": _frame_numbers(b["video"])} for b in it]
        result[mode] = {"batches": batches, "failures": num_decode_failures(it)}
    # A real collective over the two processes: every host learns how many clips each host read.
    counts = np.asarray([sum(len(b["ids"]) for b in result[m]["batches"]) for m in modes], np.int32)
    result["allgather"] = np.asarray(multihost_utils.process_allgather(counts)).tolist()
    with open(args.out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
