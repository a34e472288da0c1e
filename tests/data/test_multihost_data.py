"""2 real JAX processes (jax.distributed on 127.0.0.1, gloo) each read one epoch of the input pipeline.

Checked per mode (plain, buckets split per host, buckets shared across hosts): the hosts together see
every usable clip exactly once, bad records are skipped and counted, every batch holds one bucket and has
its shape, hosts sharing buckets emit the same shape at every step, and the frames taken at the target
fps are the expected ones. The worker is tests/data/multihost_worker.py.
"""

import json
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from klingjax.data.buckets import BucketSpec, assign_bucket
from klingjax.data.records import encode_record, make_video_record
from klingjax.data.sampling import temporal_indices
from launch.local import free_port

REPO = str(helpers.REPO)
SIZES = ((18, 34), (34, 18), (16, 16))
LENGTHS = (1, 12, 20, 24)  # at 16 fps, taken at 8 fps: 1, 6, 10, 12 frames available
NUM = 40
SPEC = BucketSpec(bases=(16,), durations=(1, 5, 9))


def _clip(i: int) -> tuple[int, int, int]:
    return (*SIZES[i % 3], LENGTHS[(i // 3) % 4])


def _write(out_dir: str) -> int:
    """NUM good clips (green channel = frame * 8) and a few bad records over 2 shards; returns the bad count."""
    bad = [b"\xc1 corrupt record", encode_record({"video": b"", "codec": "mp4", "caption": "x", "fps": 16}),
           encode_record({"video": b"<html>not a video</html>", "codec": "mp4", "caption": "x", "fps": 16})]
    writers = [ArrayRecordWriter(os.path.join(out_dir, f"m-{k:05d}-of-00002.array_record"), "group_size:1")
               for k in range(2)]
    for i in range(NUM):
        h, w, n = _clip(i)
        frames = np.zeros((n, h, w, 3), np.uint8)
        frames[..., 1] = (np.arange(n) * 8)[:, None, None]
        record = make_video_record(frames, codec="raw", caption=f"clip {i}", fps=16, num_frames=n, height=h,
                                   width=w, meta={"id": i})
        writers[i % 2].write(encode_record(record))
        if i < len(bad):
            writers[i % 2].write(bad[i])
    for writer in writers:
        writer.close()
    return len(bad)


@pytest.mark.multiprocess
def test_two_processes_read_each_clip_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    num_bad = _write(str(data))
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests/data/multihost_worker.py"),
                               "--port", str(port), "--process_id", str(i), "--num_processes", "2",
                               "--data_dir", str(data), "--out", str(tmp_path / f"host{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    hosts = [json.load(open(tmp_path / f"host{i}.json")) for i in range(2)]
    assert [h["process_index"] for h in hosts] == [0, 1] and hosts[0]["process_count"] == 2

    usable_plain = [i for i in range(NUM) if _clip(i)[2] >= 12 - 3]  # 5 frames at 8 fps need >= 9 source frames
    for mode, usable in (("plain", usable_plain), ("per_host", list(range(NUM))), ("shared", list(range(NUM)))):
        batches = [b for h in hosts for b in h[mode]["batches"]]
        seen = [i for b in batches for i in b["ids"]]
        assert sorted(seen) == usable, mode  # union is everything usable, no duplicates
        too_short = NUM - len(usable)
        assert sum(h[mode]["failures"] for h in hosts) == num_bad + too_short, mode
        for b in batches:
            buckets = {assign_bucket(SPEC, height=_clip(i)[0], width=_clip(i)[1], num_frames=_clip(i)[2], fps=16,
                                     target_fps=8) for i in b["ids"]}
            if mode == "plain":
                assert b["shape"] == [len(b["ids"]), 5, 16, 16, 3]
            else:
                assert len(buckets) == 1, (mode, b)  # one bucket per batch, and the batch has its shape
                assert b["shape"] == [len(b["ids"]), *buckets.pop(), 3], (mode, b)
            for i, frames in zip(b["ids"], b["frames"]):  # centred window, every other source frame
                assert frames == temporal_indices(_clip(i)[2], b["shape"][1], source_fps=16, target_fps=8).tolist()
    steps = list(zip(hosts[0]["shared"]["batches"], hosts[1]["shared"]["batches"]))
    full = [(a, b) for a, b in steps if len(a["ids"]) == len(b["ids"]) == 2]
    assert len(full) >= 5 and all(a["shape"] == b["shape"] for a, b in full)  # global arrays can be formed
    assert hosts[0]["allgather"] == hosts[1]["allgather"]
    assert [sum(col) for col in zip(*hosts[0]["allgather"])] == [len(usable_plain), NUM, NUM]
