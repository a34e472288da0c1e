"""Tests for klingjax.data.pipeline (plain path; buckets: test_buckets.py) and data_pipelines.make_synthetic."""

import functools
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines.make_synthetic import shard_paths, write_synthetic_dataset
from klingjax.data.buckets import BucketSpec
from klingjax.data.pipeline import VideoDecoder, decode_video_record, make_dataset, num_decode_failures, stack_batch
from klingjax.data.records import encode_record, list_shards, make_video_record, write_shards
from klingjax.data.synthetic import SyntheticSpec
from klingjax.data.video_io import encode_mp4

NUM = 24


def _index_decode(record):
    return {"i": np.int64(record["i"]), "caption": f"clip {record['i']}"}


@pytest.fixture(scope="module")
def index_shards(tmp_path_factory):
    """24 tiny records {"i": i} in 3 shards (written directly, records are plain dicts)."""
    out = tmp_path_factory.mktemp("idx")
    return write_shards(({"i": i, "x": np.full((2, 2), i, np.float32)} for i in range(NUM)), str(out), "d", 3)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _ids(batches):
    return [int(i) for b in batches for i in b["i"]]


def test_batches_and_determinism(index_shards):
    make = functools.partial(make_dataset, index_shards, decode=_index_decode, batch_size=4, shuffle=True,
                             num_epochs=1)
    batches = list(make(seed=0))
    assert len(batches) == NUM // 4
    assert batches[0]["i"].shape == (4,) and batches[0]["caption"].dtype.kind == "U"
    assert batches[0]["caption"][0] == f"clip {batches[0]['i'][0]}"
    assert sorted(_ids(batches)) == list(range(NUM))
    assert _ids(list(make(seed=0))) == _ids(batches)
    assert _ids(list(make(seed=1))) != _ids(batches)


def test_any_random_access_source():
    records = [encode_record({"i": i}) for i in range(NUM)]  # e.g. a Grain source over a TFDS split
    ids = _ids(make_dataset([], source=records, decode=_index_decode, batch_size=4, seed=0, shuffle=True,
                            num_epochs=1))
    assert sorted(ids) == list(range(NUM)) and ids != list(range(NUM))  # all of them, shuffled
    with pytest.raises(ValueError, match="no shard paths"):
        make_dataset([], decode=_index_decode, batch_size=4, seed=0, shuffle=True, num_epochs=1)


def test_epochs_reshuffle(index_shards):
    ids = _ids(make_dataset(index_shards, decode=_index_decode, batch_size=1, seed=0, shuffle=True, num_epochs=2))
    first, second = ids[:NUM], ids[NUM:]
    assert sorted(first) == sorted(second) == list(range(NUM)) and first != second


def test_checkpoint_resume_is_exact(index_shards):
    ds = make_dataset(index_shards, decode=_index_decode, batch_size=5, seed=3, shuffle=True, num_epochs=None)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # states must survive a JSON round trip (Orbax)
    expected = _take(it, 6)  # crosses an epoch boundary (24 records, batches of 5)
    restored = iter(ds)
    restored.set_state(state)
    got = _take(restored, 6)
    assert _ids(got) == _ids(expected)
    assert all(np.array_equal(a["caption"], b["caption"]) for a, b in zip(got, expected))


def test_two_hosts_cover_epoch_once(index_shards):
    seen = []
    for host in range(2):
        ds = make_dataset(index_shards, decode=_index_decode, batch_size=2, seed=0, shuffle=True, num_epochs=1,
                          process_index=host, process_count=2, drop_remainder=False)
        seen.append(_ids(ds))
    assert len(seen[0]) == len(seen[1]) == NUM // 2
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(NUM))


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    frames = np.full((4, 8, 8, 3), 255, np.uint8)
    good = make_video_record(frames, codec="raw", caption="ok", fps=8, num_frames=4, height=8, width=8)
    mp4 = encode_mp4(frames, 8)
    as_mp4 = lambda video: dict(good, codec="mp4", video=video)
    bad = [b"\xc1 not msgpack", encode_record(as_mp4(b"definitely not an mp4")), encode_record(as_mp4(b"")),
           encode_record(as_mp4(mp4[: len(mp4) // 2])), encode_record(dict(good, video=frames[:2], num_frames=2)),
           encode_record(dict(good, codec="gif"))]
    path = str(tmp_path / "v-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for payload in bad[:1] + [encode_record(good)] + bad[1:] + [encode_record(good)]:
        writer.write(payload)
    writer.close()
    decode = functools.partial(decode_video_record, num_frames=4, height=8, width=8)
    it = iter(make_dataset([path], decode=decode, batch_size=1, seed=0, shuffle=False, num_epochs=1))
    batches = list(it)
    assert len(batches) == 2 and all(b["caption"][0] == "ok" for b in batches)
    assert num_decode_failures(it) == len(bad)
    assert np.allclose(batches[0]["video"], 1.0)
    fresh = iter(make_dataset([path], decode=decode, batch_size=1, seed=0, shuffle=False, num_epochs=1))
    fresh.set_state(it.get_state())
    assert num_decode_failures(fresh) == len(bad)  # the count is part of the checkpointed state


def _tokenize(captions):
    """A stand-in tokenizer: character codes, 8 per caption."""
    ids = np.zeros((len(captions), 8), np.int32)
    for row, c in enumerate(captions):
        ids[row, : min(8, len(c))] = [ord(ch) for ch in c[:8]]
    return ids, ids > 0


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """30 raw clips of 20 frames at 16 fps whose pixel values encode (clip, frame)."""
    def record(i):
        frames = np.zeros((20, 8, 12, 3), np.uint8)
        frames[..., 0] = i
        frames[..., 1] = np.arange(20)[:, None, None] * 10
        return make_video_record(frames, codec="raw", caption=f"clip {i}", fps=16, num_frames=20, height=8,
                                 width=12, meta={"id": i})
    return write_shards((record(i) for i in range(30)), str(tmp_path_factory.mktemp("vid")), "v", 2)


def test_video_decoder_caption_dropout_and_tokenize(video_shards):
    decode = VideoDecoder(4, 8, 8, target_fps=8, random_start=True, random_crop=True)  # stride 2
    make = functools.partial(make_dataset, video_shards, decode=decode, batch_size=5, shuffle=True, num_epochs=None,
                             caption_dropout=0.5, tokenize=_tokenize)
    it = iter(make(seed=0))
    batches = _take(it, 12)  # two epochs
    frames = np.concatenate([np.round((b["video"][:, :, 4, 4, 1] + 1) * 127.5 / 10) for b in batches])  # (60, 4)
    assert np.all(np.diff(frames, axis=1) == 2)  # every other source frame
    starts = frames[:, 0]
    assert starts.min() >= 0 and starts.max() <= 13 and len(set(starts.tolist())) > 5  # random windows
    captions = [c for b in batches for c in b["caption"]]
    assert 0.3 < captions.count("") / len(captions) < 0.7
    assert {c for c in captions if c} <= {f"clip {i}" for i in range(30)}
    b = batches[0]
    assert b["text_ids"].shape == (5, 8) and np.array_equal(b["text_ids"], _tokenize(list(b["caption"]))[0])
    again = _take(iter(make(seed=0)), 12)
    assert all(np.array_equal(x["video"], y["video"]) and list(x["caption"]) == list(y["caption"])
               for x, y in zip(batches, again))
    other = _take(iter(make(seed=1)), 2)
    assert not np.array_equal(other[0]["video"], batches[0]["video"])
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    restored = iter(make(seed=0))
    restored.set_state(state)
    assert all(np.array_equal(x["video"], y["video"]) for x, y in zip(expected, _take(restored, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("bucketed", [False, True])
def test_resume_with_two_workers(video_shards, bucketed):
    """mp_prefetch with 2 worker processes: the restored iterator continues with exactly the remaining batches."""
    spec = BucketSpec(bases=(16,), durations=(1, 5, 9), image_prob=0.3) if bucketed else None
    ds = make_dataset(video_shards, decode=VideoDecoder(4, 8, 8, random_start=True), batch_size=3, seed=2,
                      shuffle=True, num_epochs=None, worker_count=2, buckets=spec, caption_dropout=0.2,
                      tokenize=_tokenize)
    it = iter(ds)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 12)
    restored = iter(ds)
    restored.set_state(state)
    got = _take(restored, 12)
    assert [b["video"].shape for b in got] == [b["video"].shape for b in expected]
    assert all(np.array_equal(x["video"], y["video"]) and list(x["caption"]) == list(y["caption"])
               for x, y in zip(expected, got))
    if bucketed:
        assert {b["video"].shape[1] for b in expected} == {1, 9}  # images and videos, never mixed in one batch


def test_decode_video_record_raw_mp4_crop_resize():
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (9, 1, 1, 3), dtype=np.uint8), 16, 1).repeat(24, 2)  # (9, 16, 24, 3)
    raw = make_video_record(frames, codec="raw", caption="c", fps=8, num_frames=9, height=16, width=24,
                            meta={"k": 1})
    out = decode_video_record(raw, num_frames=5, height=16, width=24)
    assert out["video"].shape == (5, 16, 24, 3) and out["video"].dtype == np.float32
    np.testing.assert_allclose(out["video"], frames[2:7] / 127.5 - 1.0, atol=1e-6)  # centre crop in time
    assert out["caption"] == "c" and json.loads(out["meta_json"]) == {"k": 1}
    resized = decode_video_record(raw, num_frames=9, height=8, width=8)["video"]
    assert resized.shape == (9, 8, 8, 3)
    np.testing.assert_allclose(resized[:, 4, 4], frames[:, 0, 0] / 127.5 - 1.0, atol=0.02)  # constant frames
    mp4 = make_video_record(encode_mp4(frames, 8), codec="mp4", caption="c", fps=8, num_frames=9, height=16,
                            width=24)
    decoded = decode_video_record(mp4, num_frames=9, height=16, width=24)["video"]
    assert decoded.shape == (9, 16, 24, 3) and np.abs(decoded - (frames / 127.5 - 1.0)).mean() < 0.06
    with pytest.raises(ValueError):
        decode_video_record(raw, num_frames=10, height=16, width=24)


def test_stack_batch_types():
    batch = stack_batch([{"a": np.ones(2), "s": "x", "n": 1, "d": {"b": 2.0}}, {"a": np.zeros(2), "s": "yz", "n": 2,
                                                                                "d": {"b": 3.0}}])
    assert batch["a"].shape == (2, 2) and list(batch["s"]) == ["x", "yz"] and batch["n"].tolist() == [1, 2]
    assert batch["d"]["b"].tolist() == [2.0, 3.0]


def test_write_synthetic_dataset_and_read_back(tmp_path):
    spec = SyntheticSpec(num_frames=5, height=16, width=16, size_range=(4.0, 6.0))
    out = str(tmp_path / "synth")
    manifest = write_synthetic_dataset(out, spec, seed=0, num_train=12, num_eval=3, num_shards=2)
    assert list_shards(out, "train") == shard_paths(out, manifest, "train") and len(manifest["train_shards"]) == 2
    assert len(list_shards(out, "eval")) == 2
    with open(os.path.join(out, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk["num_train"] == 12 and SyntheticSpec.from_dict(on_disk["spec"]) == spec
    mtime = os.path.getmtime(list_shards(out, "train")[0])
    assert write_synthetic_dataset(out, spec, seed=0, num_train=12, num_eval=3, num_shards=2) == on_disk
    assert os.path.getmtime(list_shards(out, "train")[0]) == mtime  # reused, not rewritten
    decode = functools.partial(decode_video_record, num_frames=5, height=16, width=16)
    batches = list(make_dataset(list_shards(out, "eval"), decode=decode, batch_size=3, seed=0, shuffle=False,
                                num_epochs=1))
    assert len(batches) == 1 and batches[0]["video"].shape == (3, 5, 16, 16, 3)
    metas = [json.loads(m) for m in batches[0]["meta_json"]]
    assert all(m["split"] == "eval" for m in metas)
    assert all(m["objects"][0]["colour"] in c for m, c in zip(metas, batches[0]["caption"]))
