"""The UMT5 encoder (Wan 2.1's text encoder) in NNX, and conversion from / to transformers' `UMT5EncoderModel`.

Architecture (transformers `UMT5EncoderModel`, fp32): shared token embedding; per block a pre-norm self-attention
with its own relative position bias (bidirectional buckets; UMT5 gives every layer a table, T5 only the first)
and no 1/sqrt(d) scaling (T5 folds it into the init), then a pre-norm gated-GELU FFN (tanh GELU); a final norm.
Norms are T5's RMS norm (no mean subtraction, no bias).

No T5/umT5 weights ship with klingjax: `load_umt5(folder)` reads a user-supplied transformers folder (e.g.
google/umt5-xxl, or the `text_encoder/` + `tokenizer/` of a diffusers Wan 2.1 pipeline), or one written by
`save_umt5` (data_pipelines/train_text_encoder.py), and returns a `FrozenTextEncoder`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klingjax.data.tokenizer import SentencePieceTokenizer
from klingjax.models.frozen_text import FrozenTextEncoder
from klingjax.models.layers.norms import RMSNorm

WEIGHTS, INDEX, CONFIG, SPIECE = "model.safetensors", "model.safetensors.index.json", "config.json", "spiece.model"
_USER_SUPPLIED = ("No T5/umT5 weights ship with klingjax: supply a transformers UMT5EncoderModel folder yourself "
                  "(e.g. google/umt5-xxl, or a diffusers Wan 2.1 pipeline root with text_encoder/ and tokenizer/), "
                  "or train a small one with `python -m data_pipelines.train_text_encoder`.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UMT5Config:
    """UMT5 encoder sizes (transformers' names); defaults are umt5-xxl, Wan 2.1's text encoder."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hf(cls, hf: Mapping) -> UMT5Config:
        """Read a transformers `config.json` dict of a UMT5 model (only its encoder is used)."""
        if hf.get("model_type", "umt5") != "umt5":
            raise ValueError(f"config model_type is {hf['model_type']!r}; only 'umt5' (per-layer position bias) "
                             "is supported")
        if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"feed_forward_proj {hf['feed_forward_proj']!r} is not supported; UMT5 uses 'gated-gelu'")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [f for f in fields if f not in hf and f not in ("layer_norm_epsilon",)]
        if missing:
            raise ValueError(f"UMT5 config.json lacks {missing}")
        return cls(**{f: hf[f] for f in fields if f in hf})

    def to_hf(self) -> dict:
        """A transformers `config.json` dict loadable by `UMT5EncoderModel.from_pretrained`."""
        return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", **dataclasses.asdict(self),
                "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
                "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": True, "dropout_rate": 0.0,
                "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "torch_dtype": "float32"}


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> np.ndarray:
    """T5's bucket (int32, same shape) of `memory - query` offsets: exact near 0, log-spaced up to max_distance.

    Computed in float32 like transformers (`_relative_position_bucket`), so boundary offsets round identically.
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + ratio.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# UMT5 in NNX (init follows transformers' T5 `_init_weights` with factor 1.0)
# ---------------------------------------------------------------------------------------------------------


def _linear(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(std), rngs=rngs)


class UMT5Attention(nnx.Module):
    """Bidirectional self-attention with a learned relative position bias and unscaled logits."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = _linear(d, inner, (d * cfg.d_kv) ** -0.5, rngs)
        self.k = _linear(d, inner, d**-0.5, rngs)
        self.v = _linear(d, inner, d**-0.5, rngs)
        self.o = _linear(inner, d, inner**-0.5, rngs)
        self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                 embedding_init=nnx.initializers.normal(d**-0.5), rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """Bias (H, L, L) added to the attention logits of a length-`length` sequence."""
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # (L, L) static
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)  # (H, L, L)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, L, D), mask (B, L) True for real tokens -> (B, L, D)."""
        b, n, _ = x.shape
        heads = (b, n, self.cfg.num_heads, self.cfg.d_kv)
        q, k, v = (proj(x).reshape(heads) for proj in (self.q, self.k, self.v))  # (B, L, H, K) each
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k) + self.position_bias(n)[None]  # (B, H, L, L)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqs,bshk->bqhk", weights, v).reshape(b, n, -1)  # (B, L, H*K)
        return self.o(out)


class UMT5Block(nnx.Module):
    """x += Attn(RMS(x)); x += wo(gelu_tanh(wi_0 RMS(x)) * wi_1 RMS(x))."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, eps=cfg.layer_norm_epsilon)
        self.attention = UMT5Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(d, eps=cfg.layer_norm_epsilon)
        self.wi_0 = _linear(d, cfg.d_ff, d**-0.5, rngs)
        self.wi_1 = _linear(d, cfg.d_ff, d**-0.5, rngs)
        self.wo = _linear(cfg.d_ff, d, cfg.d_ff**-0.5, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attn_norm(x), mask)
        h = self.ffn_norm(x)
        return x + self.wo(jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h))


class UMT5Encoder(nnx.Module):
    """UMT5 encoder: token ids (B, L) + mask (B, L) -> last hidden states (B, L, d_model)."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.blocks = nnx.List([UMT5Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)

    @property
    def dim(self) -> int:
        """Width of the hidden states."""
        return self.cfg.d_model

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.shared(ids)  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def token_logits(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection (B, L, D) -> (B, L, vocab), scaled by d**-0.5 as T5's tied LM head."""
        return jnp.einsum("bld,vd->blv", hidden * self.cfg.d_model**-0.5, self.shared.embedding[...])


# ---------------------------------------------------------------------------------------------------------
# transformers names: one declarative table, used both ways
# ---------------------------------------------------------------------------------------------------------

# Our path inside blocks[i] -> (name inside transformers' `encoder.block.{i}.`, torch Linear weight needs .T).
BLOCK_PARAMS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("layer.0.layer_norm.weight", False),
    ("attention", "q", "kernel"): ("layer.0.SelfAttention.q.weight", True),
    ("attention", "k", "kernel"): ("layer.0.SelfAttention.k.weight", True),
    ("attention", "v", "kernel"): ("layer.0.SelfAttention.v.weight", True),
    ("attention", "o", "kernel"): ("layer.0.SelfAttention.o.weight", True),
    ("attention", "relative_attention_bias", "embedding"): ("layer.0.SelfAttention.relative_attention_bias.weight",
                                                            False),
    ("ffn_norm", "scale"): ("layer.1.layer_norm.weight", False),
    ("wi_0", "kernel"): ("layer.1.DenseReluDense.wi_0.weight", True),
    ("wi_1", "kernel"): ("layer.1.DenseReluDense.wi_1.weight", True),
    ("wo", "kernel"): ("layer.1.DenseReluDense.wo.weight", True),
}
GLOBAL_PARAMS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("shared", "embedding"): ("shared.weight", False),
    ("final_norm", "scale"): ("encoder.final_layer_norm.weight", False),
}
TIED_COPIES = {"shared.weight": "encoder.embed_tokens.weight"}  # transformers may store either or both
IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full encoder-decoder checkpoint: only the encoder is used


def hf_param_table(cfg: UMT5Config) -> dict[tuple, tuple[str, bool]]:
    """Our param path -> (transformers UMT5EncoderModel key, transpose?)."""
    names = dict(GLOBAL_PARAMS)
    for i in range(cfg.num_layers):
        for ours, (theirs, transpose) in BLOCK_PARAMS.items():
            names[("blocks", i, *ours)] = (f"encoder.block.{i}.{theirs}", transpose)
    return names


class SafetensorsFolder(Mapping):
    """Lazy name -> numpy array view of a folder's `model.safetensors` or sharded `model.safetensors.index.json`."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(os.path.join(path, WEIGHTS)):
            files = {}
        else:
            raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor {INDEX}. {_USER_SUPPLIED}")
        missing = sorted({f for f in files.values() if not os.path.isfile(f)})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        self._handles = {f: safe_open(f, framework="np") for f in set(files.values()) or {os.path.join(path, WEIGHTS)}}
        self._files = files or {k: f for f, h in self._handles.items() for k in h.keys()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handles[self._files[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_umt5_weights(cfg: UMT5Config, tensors: Mapping[str, np.ndarray]) -> UMT5Encoder:
    """Build a `UMT5Encoder` from transformers-named `tensors`; every param must be present and every tensor used."""
    model = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))  # abstract: no random init
    graphdef, state = nnx.split(model)
    names, used = hf_param_table(cfg), set()
    for path, var in nnx.to_flat_state(state):
        key, transpose = names[tuple(path)]
        if key not in tensors and TIED_COPIES.get(key) in tensors:
            key = TIED_COPIES[key]
        if key not in tensors:
            raise KeyError(f"UMT5 weights lack {key!r} (for {'.'.join(map(str, path))})")
        value = np.asarray(tensors[key])
        value = value.T if transpose else value
        if value.shape != var.shape:
            raise ValueError(f"UMT5 tensor {key}: shape {value.shape} does not fit {var.shape} of {cfg}")
        var.set_value(jnp.asarray(value, jnp.float32))
        used.add(key)
    used |= {copy for key, copy in TIED_COPIES.items() if key in used}
    unused = sorted(k for k in tensors if k not in used and not k.startswith(IGNORED_PREFIXES))
    if unused:
        raise ValueError(f"{len(unused)} UMT5 tensors are not used by the encoder, e.g. {unused[:5]}; "
                         f"is the config right ({cfg})?")
    return nnx.merge(graphdef, state)


def umt5_state_dict(model: UMT5Encoder) -> dict[str, np.ndarray]:
    """The model's params as a transformers UMT5EncoderModel state dict (float32 numpy, torch layouts)."""
    names = hf_param_table(model.cfg)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = names[tuple(path)]
        value = np.asarray(var.get_value(), np.float32)
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


# ---------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------


def _resolve(path: str) -> tuple[str, str]:
    """(weights folder, spiece.model path); a diffusers pipeline root means its text_encoder/ and tokenizer/."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"UMT5 folder {path} does not exist. {_USER_SUPPLIED}")
    if not os.path.isfile(os.path.join(path, CONFIG)) and os.path.isdir(os.path.join(path, "text_encoder")):
        return os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer", SPIECE)
    return path, os.path.join(path, SPIECE)


def load_umt5(path: str) -> FrozenTextEncoder:
    """Load a frozen UMT5 encoder + its SentencePiece tokenizer from a transformers / `save_umt5` folder."""
    from safetensors import SafetensorError

    folder, spiece = _resolve(path)
    missing = [f for f in (os.path.join(folder, CONFIG), spiece) if not os.path.isfile(f)]
    if not any(os.path.isfile(os.path.join(folder, f)) for f in (WEIGHTS, INDEX)):
        missing.append(os.path.join(folder, f"{WEIGHTS} (or {INDEX})"))
    if missing:
        raise FileNotFoundError(f"UMT5 folder {path} lacks {missing}. {_USER_SUPPLIED}")
    with open(os.path.join(folder, CONFIG)) as f:
        cfg = UMT5Config.from_hf(json.load(f))
    tokenizer = SentencePieceTokenizer.from_file(spiece)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{spiece} has {tokenizer.vocab_size} pieces but the model embeds only {cfg.vocab_size}")
    try:
        model = load_umt5_weights(cfg, SafetensorsFolder(folder))
    except SafetensorError as e:
        raise ValueError(f"cannot read the safetensors weights in {folder}: {e}") from e
    return FrozenTextEncoder(model, tokenizer)


def save_umt5(model: UMT5Encoder, tokenizer: SentencePieceTokenizer, folder: str) -> None:
    """Write `folder` in transformers' layout (config.json, model.safetensors, spiece.model) for `load_umt5`."""
    from safetensors.numpy import save_file

    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, the model only {model.cfg.vocab_size}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(model.cfg.to_hf(), f, indent=2)
    save_file(umt5_state_dict(model), os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, SPIECE), "wb") as f:
        f.write(tokenizer.model_proto)
