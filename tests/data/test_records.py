"""Tests for klingjax.data.records and klingjax.data.video_io."""

import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from klingjax.data.records import decode_record, encode_record, list_shards, make_video_record, write_shards
from klingjax.data.synthetic import SyntheticSpec, generate_clip
from klingjax.data.video_io import decode_video, encode_mp4, video_fps


def test_record_round_trip_exact():
    rng = np.random.default_rng(0)
    record = {
        "video": rng.integers(0, 255, (3, 4, 5, 3), dtype=np.uint8),
        "latent": rng.normal(size=(2, 3)).astype(np.float32),
        "bf": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2],  # non-contiguous
        "scalar": np.float16(1.5),
        "caption": "a red circle", "fps": 8.0, "n": -3, "flag": True, "none": None, "raw": b"\x00\x01",
        "meta": {"objects": [{"colour": "red", "start": [1.5, 2.0]}], "nested": {"deep": [1, "x", None]}},
    }
    out = decode_record(encode_record(record))
    assert out.keys() == record.keys()
    for key in ("video", "latent", "bf"):
        assert out[key].dtype == record[key].dtype and np.array_equal(out[key], record[key])
        assert out[key].flags.writeable
    assert isinstance(out["scalar"], np.float16) and out["scalar"] == record["scalar"]
    rest = {k: v for k, v in record.items() if k not in ("video", "latent", "bf", "scalar")}
    assert {k: out[k] for k in rest} == rest


def test_corrupt_and_unsupported_inputs_raise():
    with pytest.raises(ValueError):
        decode_record(b"\xc1garbage")
    with pytest.raises(ValueError):
        decode_record(encode_record({"a": 1})[:-1])  # truncated
    with pytest.raises(TypeError):
        encode_record({"x": np.array([object()])})


def test_write_and_list_shards(tmp_path):
    records = [{"i": i, "x": np.full((2,), i, np.int32)} for i in range(10)]
    paths = write_shards(records, str(tmp_path), "train", 3)
    write_shards(records[:2], str(tmp_path), "train_extra", 1)
    (tmp_path / "train-00009-of-00010.array_record.tmp-1").write_bytes(b"")  # a crashed writer's leftover
    assert list_shards(str(tmp_path), "train") == sorted(paths) == paths
    assert [os.path.basename(p) for p in paths][0] == "train-00000-of-00003.array_record"
    seen = []
    for shard, path in enumerate(paths):
        reader = ArrayRecordReader(path)
        items = [decode_record(b) for b in reader.read_all()]
        reader.close()
        assert [r["i"] for r in items] == list(range(shard, 10, 3))  # round-robin
        seen += [r["i"] for r in items]
    assert sorted(seen) == list(range(10))


def test_failed_write_leaves_no_shard(tmp_path):
    def records():
        yield {"i": 0}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shards(records(), str(tmp_path), "train", 2)
    assert list_shards(str(tmp_path), "train") == [] and os.listdir(tmp_path) == []


def test_video_record_validation():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    rec = make_video_record(frames, codec="raw", caption="c", fps=8, num_frames=2, height=4, width=4)
    assert set(rec) == {"video", "codec", "caption", "fps", "num_frames", "height", "width", "meta"}
    with pytest.raises(ValueError):
        make_video_record(frames, codec="raw", caption="c", fps=8, num_frames=3, height=4, width=4)
    with pytest.raises(ValueError):
        make_video_record(b"", codec="webm", caption="c", fps=8, num_frames=2, height=4, width=4)


def test_mp4_round_trip():
    clip = generate_clip(SyntheticSpec(), 0, 5)
    data = encode_mp4(clip.frames, fps=8)
    assert data[4:8] == b"ftyp"  # an mp4 container
    frames = decode_video(data)
    assert frames.shape == clip.frames.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clip.frames).mean() < 6  # lossy, but close
    assert video_fps(data) == pytest.approx(8.0)
    odd = encode_mp4(clip.frames[:5, :31, :29], fps=8, codec="mpeg4")
    assert decode_video(odd).shape == (5, 32, 30, 3)  # padded to even sizes
    assert decode_video(data, max_frames=4).shape[0] == 4
    with pytest.raises(Exception):  # noqa: B017 - PyAV raises its own error types on garbage
        decode_video(b"not a video")
