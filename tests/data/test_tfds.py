"""Tests for klingjax.data.tfds_video_text: build from local clips (no TensorFlow), read back via TFDS and Grain."""

import json
import os
import pickle

import clip_fixtures as cf
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from klingjax.data.pipeline import decode_video_record
from klingjax.data.records import decode_record
from klingjax.data.tfds_video_text import KlingjaxVideoText, TfdsVideoRecords, VideoTextConfig, video_text_source

CAPTIONS = {"a.mp4": "a man on the phone", "b.mp4": "cyclists pass by", "sub/c.mp4": "a rabbit in the grass"}


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """Three small captioned clips, a zero-byte video and a video without caption; returns (dir, frames)."""
    root = tmp_path_factory.mktemp("manual")
    os.makedirs(root / "sub")
    frames = {"a.mp4": cf.write_clip(str(root / "a.mp4"), cf.CARPHONE, count=16),
              "b.mp4": cf.write_clip(str(root / "b.mp4"), cf.BIKES, count=12, size=(68, 160)),
              "sub/c.mp4": cf.write_clip(str(root / "sub/c.mp4"), cf.BUNNY, first=60, count=10, size=(72, 128))}
    for name, caption in CAPTIONS.items():
        cf.write_caption(str(root / name), caption)
    cf.write_zero_bytes(str(root / "empty.mp4"))
    cf.write_caption(str(root / "empty.mp4"), "nothing here")
    cf.copy_clip(str(root / "uncaptioned.mp4"), cf.CARPHONE)
    return str(root), frames


def _build(manual: str, data_dir: str, config: VideoTextConfig) -> KlingjaxVideoText:
    builder = KlingjaxVideoText(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return builder


def _all_frames(record: dict) -> dict:
    return decode_video_record(record, num_frames=record["num_frames"], height=record["height"],
                               width=record["width"])


def test_build_from_sidecars_and_read_through_grain(manual_dir, tmp_path):
    manual, frames = manual_dir
    builder = _build(manual, str(tmp_path), VideoTextConfig(name="native"))
    assert {s["path"]: s["reason"] for s in builder.info.metadata["skipped"]} == {
        "empty.mp4": "empty file (0 bytes)", "uncaptioned.mp4": "no caption file uncaptioned.txt"}

    source = video_text_source("klingjax_video_text/native", split="train", data_dir=str(tmp_path))
    assert len(source) == 3
    example = source[0]
    assert isinstance(example["video"], bytes) and example["video"][4:8] == b"ftyp"  # encoded mp4, not frames
    by_source = {json.loads(source[i]["meta_json"])["source"]: source[i] for i in range(3)}
    assert by_source.keys() == CAPTIONS.keys()
    for name, ex in by_source.items():
        assert ex["caption"].decode() == CAPTIONS[name]
        assert (int(ex["num_frames"]), int(ex["height"]), int(ex["width"])) == frames[name].shape[:3]
        assert float(ex["fps"]) == 25.0

    ds = grain.MapDataset.source(TfdsVideoRecords("klingjax_video_text/native", data_dir=str(tmp_path)))
    ds = ds.map(decode_record).map(lambda r: {**_all_frames(r), "source": r["meta"]["source"]})
    seen = set()
    for element in ds:
        name = element["source"]
        seen.add(name)
        assert element["caption"] == CAPTIONS[name]
        got = np.round((element["video"] + 1.0) * 127.5).astype(np.uint8)  # (T, H, W, 3)
        np.testing.assert_array_equal(got, frames[name])  # stream copy: the source clip's exact frames
    assert seen == CAPTIONS.keys()


def test_build_from_csv_cuts_and_resizes(manual_dir, tmp_path):
    manual, _ = manual_dir
    csv_dir = tmp_path / "csv"
    os.makedirs(csv_dir)
    (csv_dir / "captions.csv").write_text(f"path,caption,start,end\n{manual}/b.mp4,bikes middle,0.12,0.32\n"
                                          f"{manual}/a.mp4,phone,,\nmissing.mp4,gone,,\n")
    builder = _build(str(csv_dir), str(tmp_path), VideoTextConfig(name="csv64", max_side=64))
    assert [(s["index"], s["reason"]) for s in builder.info.metadata["skipped"]] == [(2, "file not found")]
    records = TfdsVideoRecords("klingjax_video_text/csv64", data_dir=str(tmp_path))
    records = pickle.loads(pickle.dumps(records))  # what Grain worker processes receive
    by_caption = {r["caption"]: r for r in (decode_record(records[i]) for i in range(len(records)))}
    cut = by_caption["bikes middle"]
    assert (cut["num_frames"], cut["height"], cut["width"]) == (5, 28, 64)  # 25 fps: frames 3..7
    assert cut["meta"]["start"] == 0.12 and cut["meta"]["reencoded"]
    got = np.round((_all_frames(cut)["video"] + 1.0) * 127.5)
    expected = cf.source_frames(cf.BIKES, 3, 5, (28, 64))
    assert np.abs(got - expected).mean() < 8
    assert (by_caption["phone"]["height"], by_caption["phone"]["width"]) == (52, 64)
