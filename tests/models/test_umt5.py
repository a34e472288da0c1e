"""Tests for the UMT5 encoder: T5's relative-position buckets, shapes, padding invariance, the save/load folder
round trip (single file, sharded, tied-copy names, diffusers layout), clear errors; and (torch marker) parity
with transformers' UMT5EncoderModel, its bucket function and its T5Tokenizer."""

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from klingjax.data.tokenizer import SentencePieceTokenizer, train_unigram
from klingjax.models import text_encoders
from klingjax.models.umt5 import (
    UMT5Config,
    UMT5Encoder,
    hf_param_table,
    load_umt5,
    load_umt5_weights,
    relative_position_bucket,
    save_umt5,
    umt5_state_dict,
)

CAPTIONS = [f"a {c} {s} moves {d} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
            for d in ("left", "up") for b in ("black", "gray")]
TEXTS = ["a red circle moves left on a black background", "a blue square", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer(train_unigram(CAPTIONS * 4, 64))


def _tiny_cfg(vocab_size: int) -> UMT5Config:
    return UMT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _random_weights(cfg: UMT5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers-named random weights (numpy: no per-op XLA compiles as an eager NNX init would need)."""
    abstract = nnx.state(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))))
    rng, names, out = np.random.default_rng(seed), hf_param_table(cfg), {}
    for path, var in nnx.to_flat_state(abstract):
        key, transpose = names[tuple(path)]
        mean, std = (1.0, 0.2) if "norm" in key else (0.0, 1.0 if key == "shared.weight" else 0.3)
        out[key] = rng.normal(mean, std, var.shape[::-1] if transpose else var.shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    cfg = _tiny_cfg(tokenizer.vocab_size + 1)
    model = load_umt5_weights(cfg, _random_weights(cfg))
    path = str(tmp_path_factory.mktemp("umt5"))
    save_umt5(model, tokenizer, path)
    return path


def _t5_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """Mesh TensorFlow's `_relative_position_bucket` (bidirectional) for one offset, float32 logs as in TF/torch."""
    half = num_buckets // 2
    bucket = half if rel > 0 else 0
    n = abs(rel)
    max_exact = half // 2
    if n < max_exact:
        return bucket + n
    val = np.float32(np.log(np.float32(n) / np.float32(max_exact)))
    val = val / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    return bucket + min(max_exact + int(val), half - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_match_t5_formula(num_buckets, max_distance):
    rel = np.arange(-400, 401)
    got = relative_position_bucket(rel, num_buckets, max_distance)
    want = np.array([_t5_bucket(int(r), num_buckets, max_distance) for r in rel])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and got.min() == 0 and got.max() == num_buckets - 1
    if (num_buckets, max_distance) == (32, 128):  # T5 defaults, by hand
        assert [int(relative_position_bucket(np.array(r), 32, 128)) for r in (0, -1, 1, -7, 7, -8, -200, 200)] == [
            0, 1, 17, 7, 23, 8, 15, 31]


def test_shapes_and_padding_invariance(folder, tokenizer):
    encoder = load_umt5(folder)
    assert isinstance(encoder.model, UMT5Encoder) and encoder.dim == 32
    hidden, mask = encoder.encode(TEXTS, max_len=16)
    assert hidden.shape == (3, 16, 32) and hidden.dtype == jnp.float32 and mask.shape == (3, 16)
    assert mask.sum(1).tolist() == [len(tokenizer.pieces(t)) + 1 for t in TEXTS]
    assert float(jnp.abs(hidden * ~mask[..., None]).max()) == 0.0 and float(jnp.abs(hidden[2, 0]).max()) > 0
    alone, m_alone = encoder.encode(TEXTS[1:2], max_len=5)  # shorter padding, no batch neighbours
    n = int(m_alone.sum())
    np.testing.assert_allclose(hidden[1, :n], alone[0, :n], atol=1e-5)
    assert float(jnp.abs(hidden[0, :n] - hidden[1, :n]).max()) > 1e-2  # content matters


def test_save_load_round_trip_and_text_encoder_switch(folder, tokenizer, tmp_path):
    encoder = load_umt5(folder)
    assert text_encoders.load_text_encoder(folder).dim == 32
    ids, mask = encoder.tokenize(TEXTS, 12)
    want = np.asarray(encoder.encode_tokens(ids, mask))
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["UMT5EncoderModel"] and UMT5Config.from_hf(hf) == _tiny_cfg(tokenizer.vocab_size + 1)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    assert weights.keys() == umt5_state_dict(encoder.model).keys() and len(weights) == 2 + 2 * 10

    # Sharded (index + two files), the tied copy's name instead of `shared.weight`, decoder tensors ignored.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    renamed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in weights.items()}
    renamed["decoder.final_layer_norm.weight"] = np.ones(32, np.float32)
    keys = sorted(renamed)
    index = {"weight_map": {}}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: renamed[k] for k in part}, str(sharded / name))
        index["weight_map"].update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "spiece.model"):
        shutil.copy(os.path.join(folder, name), sharded / name)
    got = load_umt5(str(sharded)).encode_tokens(ids, mask)
    np.testing.assert_array_equal(np.asarray(got), want)

    pipeline = tmp_path / "pipeline"  # a diffusers Wan pipeline root: text_encoder/ + tokenizer/spiece.model
    shutil.copytree(folder, pipeline / "text_encoder")
    (pipeline / "tokenizer").mkdir()
    os.replace(pipeline / "text_encoder" / "spiece.model", pipeline / "tokenizer" / "spiece.model")
    np.testing.assert_array_equal(np.asarray(load_umt5(str(pipeline)).encode_tokens(ids, mask)), want)


def _copy(folder, dest, weights=None, config=None):
    shutil.copytree(folder, dest)
    if weights is not None:
        save_file(weights, os.path.join(dest, "model.safetensors"))
    if config is not None:
        with open(os.path.join(dest, "config.json"), "w") as f:
            json.dump(config, f)
    return str(dest)


def test_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="user|google/umt5-xxl"):
        load_umt5(str(tmp_path / "absent"))
    os.remove(_copy(folder, tmp_path / "no_spiece") + "/spiece.model")
    with pytest.raises(FileNotFoundError, match="spiece.model.*google/umt5-xxl"):
        load_umt5(str(tmp_path / "no_spiece"))
    os.remove(_copy(folder, tmp_path / "no_weights") + "/model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_umt5(str(tmp_path / "no_weights"))

    weights = load_file(os.path.join(folder, "model.safetensors"))
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    with pytest.raises(KeyError, match=key):
        load_umt5(_copy(folder, tmp_path / "missing", {k: v for k, v in weights.items() if k != key}))
    with pytest.raises(ValueError, match=f"{key}: shape"):
        load_umt5(_copy(folder, tmp_path / "shape", {**weights, key: weights[key][:, :-1].copy()}))
    with pytest.raises(ValueError, match="not used.*encoder.block.2"):
        extra = {**weights, "encoder.block.2.layer.0.layer_norm.weight": np.ones(32, np.float32)}
        load_umt5(_copy(folder, tmp_path / "extra", extra))

    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match="model_type.*'t5'"):
        load_umt5(_copy(folder, tmp_path / "t5", config={**hf, "model_type": "t5"}))
    with pytest.raises(ValueError, match="gated-gelu"):
        load_umt5(_copy(folder, tmp_path / "relu", config={**hf, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="pieces but the model embeds only 8"):
        small = {**hf, "vocab_size": 8}
        load_umt5(_copy(folder, tmp_path / "vocab", {**weights, "shared.weight": weights["shared.weight"][:8]}, small))


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers (torch extra)
# ---------------------------------------------------------------------------------------------------------


def _hf_tiny(torch, transformers, vocab_size):
    config = transformers.UMT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                     dropout_rate=0.0)
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norm scales too, so that every tensor matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.torch
def test_matches_transformers_umt5_encoder(tmp_path, tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _hf_tiny(torch, transformers, tokenizer.vocab_size)
    for name, shard in (("single", None), ("sharded", "20KB")):
        path = tmp_path / name
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        (path / "spiece.model").write_bytes(tokenizer.model_proto)
        assert (path / "model.safetensors.index.json").exists() == (shard is not None)
        encoder = load_umt5(str(path))
        ids, mask = encoder.tokenize(TEXTS + ["a green square moves up on a gray background " * 3], 24)
        got = np.asarray(encoder.encode_tokens(ids, mask))
        with torch.no_grad():
            want = model(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
        want = want.last_hidden_state.numpy() * mask[..., None]  # klingjax zeroes padded positions
        assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
        assert np.abs(want).max() > 0.5


@pytest.mark.torch
def test_saved_folder_loads_in_transformers(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    encoder = load_umt5(folder)
    ids, mask = encoder.tokenize(TEXTS, 12)
    ref = transformers.UMT5EncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))).last_hidden_state
    np.testing.assert_allclose(np.asarray(encoder.encode_tokens(ids, mask)), want.numpy() * mask[..., None], atol=1e-4)


@pytest.mark.torch
def test_buckets_and_tokenizer_match_transformers(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    for num_buckets, max_distance in ((32, 128), (8, 20), (64, 256), (32, 64)):
        cfg = transformers.UMT5Config(relative_attention_num_buckets=num_buckets,
                                      relative_attention_max_distance=max_distance)
        rel = torch.arange(-600, 601)
        want = UMT5Attention(cfg, has_relative_attention_bias=True)._relative_position_bucket(rel).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel.numpy(), num_buckets, max_distance), want)

    ours = SentencePieceTokenizer.from_file(os.path.join(folder, "spiece.model"))
    hf = transformers.T5Tokenizer.from_pretrained(folder, extra_ids=0)
    texts = TEXTS + ["A  purple, hexagon!", "a green square moves up on a gray background " * 3]
    out = hf(texts, padding="max_length", truncation=True, max_length=12, return_tensors="np")
    ids, mask = ours(texts, 12)
    np.testing.assert_array_equal(ids, out["input_ids"])
    np.testing.assert_array_equal(mask, out["attention_mask"].astype(bool))
