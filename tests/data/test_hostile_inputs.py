"""Hostile inputs to the data tools: captions rows escaping the input root, outputs landing outside --output,
videos whose headers declare absurd sizes (skipped or counted, never decoded), and config files (parsed as
data, loaded only from the paths given).

The absurd-size videos are emulated cheaply: a real 16x16 rawvideo AVI with the width/height fields of its
headers patched (`_patched_avi`). FFmpeg reports the patched size as the stream's size (rawvideo has no
bitstream header of its own), so the refusal is exercised exactly as a hostile file would trigger it; the
file does not hold 100000 px of pixel data, so a refusal that came too late would show up as a different
(decode) error, not as an allocation.
"""

import ast
import csv
import functools
import io
import json
import os
import struct
import subprocess
import sys
import time

import av
import helpers
import numpy as np
import pytest

from data_pipelines import convert_videos as cv
from klingjax.data.buckets import BucketSpec
from klingjax.data.inputs import list_inputs
from klingjax.data.pipeline import VideoDecoder, decode_video_record, make_dataset, num_decode_failures
from klingjax.data.probe import ClipError, load_clip
from klingjax.data.records import encode_record, make_video_record
from klingjax.data.sampling import video_metadata
from klingjax.data.video_io import VideoLimits, VideoTooLarge, decode_frames, decode_video, encode_mp4, probe_video

REPO = str(helpers.REPO)


def _tiny_mp4(path=None, frames=4, height=16, width=16) -> bytes:
    data = encode_mp4(np.full((frames, height, width, 3), 128, np.uint8), 8)
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


@functools.cache
def _patched_avi(width: int, height: int) -> bytes:
    """A 2-frame 16x16 rawvideo AVI whose headers (avih and the stream's BITMAPINFOHEADER) claim width x height."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(buffer.getvalue())
    strf, avih = data.find(b"strf"), data.find(b"avih")
    struct.pack_into("<ii", data, strf + 12, width, height)  # biWidth, biHeight
    struct.pack_into("<II", data, avih + 8 + 32, width, height)  # dwWidth, dwHeight
    return bytes(data)


# ---------------------------------------------------------------------------------------------------
# Converter: rows must stay inside the input root; outputs inside --output
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """root/ with ok.mp4 and sub/deep.mp4 (+ captions), outside/ with secret.mp4, and root/link.mp4 -> outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for path in (root / "ok.mp4", root / "sub" / "deep.mp4", outside / "secret.mp4"):
        _tiny_mp4(path)
        path.with_suffix(".txt").write_text("a grey square")
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    (root / "link.txt").write_text("a caption next to the link")
    os.symlink(outside, root / "linked_dir")  # symlinked folders are not walked
    return root, outside


def test_rows_escaping_the_root_are_skipped_with_the_reason(tree, tmp_path):
    root, outside = tree
    rows = [("ok.mp4", "inside"), ("sub/../sub/deep.mp4", "inside, with .. that stays inside"),
            (str(root / "ok.mp4"), "absolute, inside the root"), ("../outside/secret.mp4", "dot-dot out"),
            (str(outside / "secret.mp4"), "absolute, outside"), ("link.mp4", "symlink pointing out"),
            ("../outside/missing.mp4", "outside and missing")]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "caption")] + rows)
    section = cv.convert_videos(str(root / "captions.csv"), str(tmp_path / "out"), num_shards=2)
    assert sorted(e["index"] for e in section["written"]) == [0, 1, 2]
    reasons = {e["index"]: e["reason"] for e in section["skipped"]}
    assert sorted(reasons) == [3, 4, 5, 6]
    real_outside = os.path.realpath(outside)
    for i in (3, 4, 5, 6):  # not "file not found" for 6: nothing outside the root is even looked at
        assert reasons[i].startswith(f"path escapes the input root {root} (resolves to {real_outside}"), reasons[i]
    # The same rows with a wider --input_root are read: the root is the user's choice, not the list's.
    jsonl = root / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows[3:6]))
    items = list_inputs(str(jsonl), root=str(tmp_path))
    assert [r.error for r in items] == [None, None, None]
    assert [r.error for r in list_inputs(str(jsonl))] == [None, None, None]  # no root: the library call is open


def test_folder_input_skips_symlinks_out_and_does_not_walk_linked_folders(tree, tmp_path):
    root, _ = tree
    section = cv.convert_videos(str(root), str(tmp_path / "out"), num_shards=1)
    assert sorted(e["path"] for e in section["written"]) == ["ok.mp4", "sub/deep.mp4"]
    assert [(e["path"], e["reason"].split(" (")[0]) for e in section["skipped"]] == [
        ("link.mp4", f"path escapes the input root {root}")]


@pytest.mark.parametrize("where", ["inside", "same", "holds_root", "holds_csv"])
def test_output_overlapping_the_inputs_is_refused_before_writing(tree, tmp_path, where):
    root, _ = tree
    (root / "captions.csv").write_text("path,caption\nok.mp4,fine\n")
    source = str(root / "captions.csv")
    out = {"inside": root / "shards", "same": root, "holds_root": tmp_path, "holds_csv": root}[where]
    input_root = str(root / "sub") if where == "holds_csv" else None
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=rf"--output {out} overlaps the input root .*narrow --input_root"):
        cv.convert_videos(source, str(out), input_root=input_root)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, not even the output folder


@pytest.mark.parametrize("split", ["../evil", "a/b", "/abs", "*", "tr[a]in", ".hidden", "", "va-l", "x\\y"])
def test_split_that_could_write_outside_output_is_refused(tree, tmp_path, split):
    root, _ = tree
    with pytest.raises(ValueError, match="split must be a plain name"):
        cv.convert_videos(str(root), str(tmp_path / "out"), split=split)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil-00000-of-00001.array_record").exists()


def test_cli_turns_refusals_into_usage_errors(tree, tmp_path):
    root, _ = tree
    holders = {k: type("Flag", (), {"value": v})() for k, v in {
        "input": str(root), "output": str(root / "out"), "input_root": None, "num_shards": 1, "num_workers": 1,
        "split": "train", "max_side": None, "min_frames": 1, "reencode": False}.items()}
    with pytest.raises(cv.app.UsageError, match="overlaps the input root"):
        cv.main([], holders)
    assert not (root / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Absurd sizes: refused from the header, before any frame is decoded
# ---------------------------------------------------------------------------------------------------


def test_limits_name_the_size_and_the_limit():
    limits = VideoLimits()
    limits.check(8192, 4320, 1000)  # 8K is fine
    with pytest.raises(VideoTooLarge, match=r"too large: 100000x64 \(width x height\) is over 8192 px a side"):
        limits.check(100000, 64)
    with pytest.raises(VideoTooLarge, match=r"too large: 8000x8000 \(width x height\) is 64.0 MP, over 36 MP"):
        limits.check(8000, 8000)
    with pytest.raises(VideoTooLarge, match="too long: 20000000 frames, over 10000000"):
        limits.check(64, 64, 20_000_000)


def test_converter_skips_a_100000_px_wide_clip_without_decoding_it(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "huge.avi").write_bytes(_patched_avi(100000, 64))
    (root / "fine.avi").write_bytes(_patched_avi(16, 16))  # the same file unpatched: converts
    for name in ("huge", "fine"):
        (root / f"{name}.txt").write_text("a caption")
    t0 = time.perf_counter()
    section = cv.convert_videos(str(root), str(tmp_path / "out"), num_shards=1)
    assert time.perf_counter() - t0 < 10
    assert [e["path"] for e in section["written"]] == ["fine.avi"]
    assert section["skipped"] == [{"index": 1, "path": "huge.avi",
                                   "reason": "too large: 100000x64 (width x height) is over 8192 px a side"}]
    t0 = time.perf_counter()
    with pytest.raises(ClipError, match=r"too large: 6100x6000 \(width x height\) is 36.6 MP"):
        load_clip(str(_write(tmp_path / "big.avi", _patched_avi(6100, 6000))))
    assert time.perf_counter() - t0 < 1
    with pytest.raises(ClipError, match="too long: 4 frames, over 3"):  # a tighter option, on a real clip
        load_clip(str(_write(tmp_path / "four.mp4", _tiny_mp4())), limits=VideoLimits(max_frames=3))
    assert "limits" in section["options"]  # recorded in the manifest (and part of the resume fingerprint)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_decode_path_refuses_declared_sizes_before_decoding():
    huge = _patched_avi(100000, 64)
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        probe_video(huge)
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        decode_frames(huge, [0])
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        decode_video(huge)
    np.testing.assert_array_equal(decode_frames(_patched_avi(16, 16), [0, 1]), np.zeros((2, 16, 16, 3)))
    # The record's own metadata lies (16x16): the stream header is checked again when decoding starts.
    lying = make_video_record(huge, codec="mp4", caption="c", fps=25, num_frames=2, height=16, width=16)
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        decode_video_record(lying, num_frames=1, height=16, width=16)
    # The record claims the absurd size: refused from the metadata alone, the mp4 is never opened.
    claims = make_video_record(b"not even a video", codec="mp4", caption="c", fps=8, num_frames=4, height=64,
                               width=100000)
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        decode_video_record(claims, num_frames=1, height=16, width=16)
    with pytest.raises(VideoTooLarge, match="too large: 100000x64"):
        video_metadata(dict(lying, num_frames=None))  # the bucket peek probes the header


def test_thin_clip_is_not_scaled_to_an_absurd_cover_size(monkeypatch):
    """16x4096 covering 256x256 would scale to 256x65536 in one go: decode at native size and crop instead."""
    import klingjax.data.sampling as sampling

    sizes = []
    real = sampling.decode_frames
    monkeypatch.setattr(sampling, "decode_frames", lambda *a, **k: sizes.append(k.get("size")) or real(*a, **k))
    record = make_video_record(_tiny_mp4(frames=2, height=16, width=4096), codec="mp4", caption="c", fps=8,
                               num_frames=2, height=16, width=4096)
    out = decode_video_record(record, num_frames=2, height=256, width=256, dtype=np.uint8)
    assert out["video"].shape == (2, 256, 256, 3) and sizes == [None]
    square = make_video_record(_tiny_mp4(frames=2), codec="mp4", caption="c", fps=8, num_frames=2, height=16,
                               width=16)
    decode_video_record(square, num_frames=2, height=32, width=32)
    assert sizes == [None, (32, 32)]  # ordinary clips still scale while converting to RGB


@pytest.mark.parametrize("bucketed", [False, True])
def test_pipeline_counts_absurd_records_as_decode_failures(bucketed):
    frames = np.full((4, 8, 8, 3), 255, np.uint8)
    good = make_video_record(frames, codec="raw", caption="ok", fps=8, num_frames=4, height=8, width=8)
    huge = make_video_record(_patched_avi(100000, 64), codec="mp4", caption="c", fps=25, num_frames=2, height=16,
                             width=16)
    claims = make_video_record(_tiny_mp4(), codec="mp4", caption="c", fps=8, num_frames=4, height=64,
                               width=100000)
    source = [encode_record(r) for r in (good, huge, good, claims, good)]
    spec = BucketSpec(bases=(16,), durations=(1,), image_prob=0.0) if bucketed else None
    it = iter(make_dataset([], source=source, decode=VideoDecoder(1, 8, 8), batch_size=1, seed=0, shuffle=False,
                           num_epochs=1, buckets=spec))
    batches = list(it)
    assert len(batches) == 3 and all(b["caption"][0] == "ok" for b in batches)
    assert num_decode_failures(it) == 2


# ---------------------------------------------------------------------------------------------------
# Config files: parsed as data, loaded only from the paths the user gave
# ---------------------------------------------------------------------------------------------------


def test_workdir_config_json_is_data_not_code(tmp_path):
    from klingjax.config import ExperimentConfig, config_from_dataclass
    from klingjax.layout import load_workdir_config

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    config = json.loads(config_from_dataclass(ExperimentConfig(name="x")).to_json())
    config["name"] = payload
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_workdir_config(str(tmp_path)).name == payload  # a plain string, never evaluated
    (tmp_path / "config.json").write_text(payload)  # Python, not JSON: a parse error, not an execution
    with pytest.raises(ValueError):
        load_workdir_config(str(tmp_path))
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_workdir_config(str(tmp_path / "nowhere"))


def _calls(path: str) -> set[str]:
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_config_loaders_execute_only_the_files_named():
    """layout reads JSON only; main's one config source is its --config flag; a sweep names its file."""
    code_loaders = {"eval", "exec", "exec_module", "import_module", "run_path", "load", "loads", "unsafe_load"}
    assert _calls("klingjax/layout.py") & code_loaders == {"load"}  # json.load ...
    assert "import json" in open(os.path.join(REPO, "klingjax/layout.py")).read()
    assert "pickle" not in open(os.path.join(REPO, "klingjax/layout.py")).read()
    main = open(os.path.join(REPO, "klingjax/main.py")).read()
    assert main.count("DEFINE_config_file(") == 1 and "environ.get(" not in main and "getcwd" not in main
    from launch.sweep import SweepError, load_sweep

    with pytest.raises(SweepError, match="sweep '/nonexistent/sweep.py' does not exist"):
        load_sweep("/nonexistent/sweep.py:runlocal")


@pytest.fixture(scope="module")
def missing_config_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cfg") / "work"
    env = {**os.environ, "KLINGJAX_HOST_MALLOC": "default", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "klingjax.main", "--config=/nonexistent/cfg.py",
                           f"--workdir={workdir}"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    return proc, workdir


@pytest.mark.slow  # one klingjax.main process (~5 s of imports)
def test_missing_config_path_fails_without_running(missing_config_run):
    proc, workdir = missing_config_run
    assert proc.returncode != 0 and not workdir.exists()


@pytest.mark.slow
def test_missing_config_path_error_names_the_file(missing_config_run):
    proc, _ = missing_config_run
    assert "/nonexistent/cfg.py" in proc.stderr.splitlines()[-1]
