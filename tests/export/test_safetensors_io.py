"""Streaming safetensors: shard planning, files readable by the `safetensors` package, lazy reads, errors, and
hostile files (inconsistent headers, huge claimed sizes, index entries outside the folder) refused before reading."""

import json
import os
import shutil
import struct
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from klingjax.export.safetensors_io import (
    SafetensorsError,
    SafetensorsFolder,
    ShardedWriter,
    TensorSpec,
    parse_size,
    plan_shards,
)


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((64, 32)).astype(np.float32),  # 8 KiB
        "a.bias": rng.standard_normal(64).astype(np.float32),
        "b.weight": rng.standard_normal((3, 5, 7)).astype(ml_dtypes.bfloat16),
        "c.big": rng.standard_normal((128, 64)).astype(np.float32),  # 32 KiB: larger than a shard
        "d.half": rng.standard_normal((9,)).astype(np.float16),
    }


def _write(folder, tensors, max_bytes):
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
    w = ShardedWriter(str(folder), "model", specs, max_bytes)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return w


def test_sharded_write_then_lazy_read_is_exact(tmp_path):
    tensors = _tensors()
    w = _write(tmp_path, tensors, 10_000)
    assert len(w.files) == 3 and w.files[0] == "model-00001-of-00003.safetensors"
    sizes = [sum(s.nbytes for s in shard) for shard in w.shards]
    assert sizes[0] <= 10_000 and sizes[1] == tensors["c.big"].nbytes  # an oversize tensor gets its own shard
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == sum(sizes)
    reader = SafetensorsFolder(str(tmp_path), "model")
    for k, v in tensors.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got.view(np.uint8), v.view(np.uint8))
    # The reference implementation reads our shards too.
    merged = {}
    for f in w.files:
        merged.update(load_file(os.path.join(tmp_path, f)))
    np.testing.assert_array_equal(merged["a.weight"], tensors["a.weight"])


def test_single_file_when_everything_fits(tmp_path):
    w = _write(tmp_path, _tensors(), 10**9)
    assert w.files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(_tensors())


def test_writer_enforces_plan_and_completeness(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
    w = ShardedWriter(str(tmp_path), "model", specs, 10_000)
    with pytest.raises(ValueError, match="expected"):
        w.write("a.bias", tensors["a.bias"])  # out of order
    w.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_reader_refuses_pickles_and_plan_shards_edge_cases(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="pickled weights are not read"):
        SafetensorsFolder(str(tmp_path), "diffusion_pytorch_model")
    assert plan_shards([], 10) == []
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------------
# Hostile files: refused with a SafetensorsError naming the file (and tensor) before any tensor is allocated
# ---------------------------------------------------------------------------------------------------


def _raw_file(path, header, data=b"", length=None):
    """A safetensors file from a header dict (or raw header bytes) and data, with an optional false length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def _refused(folder, match):
    """Open `folder` and check the refusal: its message, < 1 s, and no large Python-heap allocation on the way."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SafetensorsError, match=match) as e:
            SafetensorsFolder(str(folder), "model")
        elapsed, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 2**20, (elapsed, peak)  # nothing near the claimed size was allocated
    assert isinstance(e.value, ValueError)  # klingjax-import reports ValueErrors as one line, exit code 2
    return str(e.value)


F32_16 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, length, match", [
    (F32_16, 2**60, r"header length field says 1152921504606846976 bytes"),
    ({"w": {"dtype": "F32", "shape": [2**18, 2**20], "data_offsets": [0, 2**40]}}, None,  # a 1 TiB tensor
     r"tensor 'w': data_offsets \[0, 1099511627776\] run past the data section \(16 bytes\)"),
    ({"w": {"dtype": "F32", "shape": [2**18, 2**20], "data_offsets": [0, 16]}}, None,
     r"tensor 'w': F32 \[262144, 1048576\] needs 1099511627776 bytes, data_offsets \[0, 16\] hold 16"),
    ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, None, r"'w': F32 \[8\] needs 32 bytes"),
    ({"w": {**F32_16, "dtype": "PYOBJECT"}}, None, r"tensor 'w': unsupported dtype 'PYOBJECT'"),
    ({"w": {**F32_16, "shape": [-4]}}, None, r"tensor 'w': shape must be a list of non-negative ints"),
    ({"w": {**F32_16, "shape": [True, 4]}}, None, r"shape must be a list of non-negative ints"),
    ({"w": {**F32_16, "data_offsets": [16, 0]}}, None, r"data_offsets must be \[begin, end\]"),
    ({"w": {**F32_16, "extra": 1}}, None, r"tensor 'w': entry must hold exactly dtype, shape, data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {"dtype": "F32", "shape": [0],
      "data_offsets": [4, 4]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}, None,
     r"tensor 'b' overlaps tensor 'a'"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "w": {}}', None, r"duplicate keys \['w'\]"),
    (b"[1, 2, 3]", None, r"header is a JSON list, expected an object"),
    (b"\xff\xfe not json", None, r"header is not valid JSON"),
    ({"__metadata__": "a string", "w": F32_16}, None, r"__metadata__ must be an object"),
])
def test_inconsistent_header_is_refused_before_allocating(tmp_path, header, length, match):
    header = {"w": header} if header is F32_16 else header
    path = _raw_file(tmp_path / "model.safetensors", header, b"\0" * 16, length)
    message = _refused(tmp_path, match)
    assert message.startswith(path)  # names the file


def test_too_short_file_and_truncated_read(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    _refused(tmp_path, r"model.safetensors: 2 bytes is too short")
    path = _raw_file(tmp_path / "model.safetensors", {"w": F32_16}, np.arange(4, dtype=np.float32).tobytes())
    reader = SafetensorsFolder(str(tmp_path), "model")
    np.testing.assert_array_equal(reader.get("w"), np.arange(4))
    with open(path, "r+b") as f:  # the file shrinks after its header was checked
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(SafetensorsError, match=r"tensor 'w': read 12 of its 16 bytes \(truncated file\)"):
        reader.get("w")


def test_reference_writer_files_pass_validation(tmp_path):
    tensors = {"x": np.ones((2, 3), np.float16), "empty": np.zeros((0, 4), np.float32), "y": np.arange(5)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = SafetensorsFolder(str(tmp_path), "model")
    for k, v in tensors.items():
        np.testing.assert_array_equal(reader.get(k), v)


@pytest.mark.parametrize("shard, match", [
    ("../outside.safetensors", r"tensor 'w' points at '../outside.safetensors', not a .safetensors file in"),
    ("/etc/passwd", r"tensor 'w' points at '/etc/passwd'"),
    ("sub/model.safetensors", r"points at 'sub/model.safetensors'"),
    ("model-00002-of-00002.safetensors", r"1 tensors are not in the shard it names, e.g. 'w' -> model-00002"),
])
def test_index_may_only_name_shards_inside_the_folder(tmp_path, shard, match):
    (tmp_path / "sub").mkdir()
    outside = _raw_file(tmp_path / "outside.safetensors", {"w": F32_16}, b"\0" * 16)
    shutil.copy(outside, tmp_path / "sub" / "model.safetensors")
    shutil.copy(outside, tmp_path / "sub" / "model-00001-of-00002.safetensors")
    folder = tmp_path / "sub"
    _raw_file(folder / "model-00002-of-00002.safetensors", {"v": F32_16}, b"\0" * 16)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    message = _refused(folder, match)
    assert "model.safetensors.index.json" in message


def test_importer_cli_reports_a_hostile_file_in_one_line(tmp_path, capsys):
    from klingjax.export import importer

    transformer = tmp_path / "wan" / "transformer"
    transformer.mkdir(parents=True)
    config = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 8,
              "ffn_dim": 32, "num_layers": 1, "text_dim": 16, "freq_dim": 16}
    (transformer / "config.json").write_text(json.dumps(config))
    bad = {"w": {"dtype": "F32", "shape": [2**18, 2**20], "data_offsets": [0, 2**40]}}
    path = _raw_file(transformer / "diffusion_pytorch_model.safetensors", bad, b"\0" * 16)
    with pytest.raises(SystemExit) as e:
        importer.main(["--diffusers", str(tmp_path / "wan"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"klingjax-import: error: {path}: tensor 'w': data_offsets" in err
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["wan"]  # nothing left behind
