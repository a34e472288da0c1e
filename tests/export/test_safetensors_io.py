"""Streaming safetensors: shard planning, files readable by the `safetensors` package, lazy reads, errors."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from klingjax.export.safetensors_io import SafetensorsFolder, ShardedWriter, TensorSpec, parse_size, plan_shards


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
