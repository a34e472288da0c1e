"""Tests for klingjax.data.pipeline and data_pipelines.make_synthetic."""

import functools
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines.make_synthetic import shard_paths, write_synthetic_dataset
from klingjax.data.pipeline import decode_video_record, make_dataset, num_decode_failures, stack_batch
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
    bad_mp4 = dict(good, codec="mp4", video=b"definitely not an mp4")
    path = str(tmp_path / "v-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for payload in (encode_record(good), b"\xc1 not msgpack", encode_record(good), encode_record(bad_mp4)):
        writer.write(payload)
    writer.close()
    decode = functools.partial(decode_video_record, num_frames=4, height=8, width=8)
    it = iter(make_dataset([path], decode=decode, batch_size=1, seed=0, shuffle=False, num_epochs=1))
    batches = list(it)
    assert len(batches) == 2 and all(b["caption"][0] == "ok" for b in batches)
    assert num_decode_failures(it) == 2
    assert np.allclose(batches[0]["video"], 1.0)
    fresh = iter(make_dataset([path], decode=decode, batch_size=1, seed=0, shuffle=False, num_epochs=1))
    fresh.set_state(it.get_state())
    assert num_decode_failures(fresh) == 2  # the count is part of the checkpointed state


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
