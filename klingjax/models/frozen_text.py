"""`FrozenTextEncoder`: a tokenizer + a frozen encoder module -> hidden states (B, L, D) and masks (B, L).

Shared by every text encoder (MiniLM in `text_encoders.py`, UMT5 in `umt5.py`); it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Tokenizer(Protocol):
    """What `FrozenTextEncoder` needs: texts -> (ids int32 (B, max_len), mask bool (B, max_len))."""

    def __call__(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]: ...


def _encode(graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))  # frozen: no gradient reaches the weights
    hidden = model(ids, mask)  # (B, L, D)
    return jax.lax.stop_gradient(hidden * mask[..., None])  # padded positions are zeroed


# Params travel as jit arguments (closing over them would bake the weights into the program as constants); the
# graphdef is static, so encoders of one architecture loaded twice share the compiled program.
_encode_jit = jax.jit(_encode, static_argnums=0)


class FrozenTextEncoder:
    """A tokenizer and a frozen encoder: texts -> (hidden (B, L, D), mask (B, L)) or embeddings (B, D)."""

    def __init__(self, model: nnx.Module, tokenizer: Tokenizer):
        self.dim = model.dim
        self.tokenizer = tokenizer
        self._graphdef, self._params = nnx.split(model)

    @property
    def model(self) -> nnx.Module:
        """The encoder module holding the frozen weights (e.g. for a tied output head)."""
        return nnx.merge(self._graphdef, self._params)

    def tokenize(self, texts: Sequence[str], max_len: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 (B, max_len) with the tokenizer's specials, truncated, right-padded; mask (B, max_len)."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts), max_len)

    def encode_tokens(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Hidden states (B, L, D) float32 for token ids (B, L); padded positions are zero."""
        return _encode_jit(self._graphdef, self._params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

    def encode(self, texts: Sequence[str], max_len: int = 32) -> tuple[jax.Array, jax.Array]:
        """Texts -> (hidden (B, max_len, D), mask (B, max_len))."""
        ids, mask = self.tokenize(texts, max_len)
        return self.encode_tokens(ids, mask), jnp.asarray(mask)

    def embed_sentences(self, texts: Sequence[str], max_len: int = 128) -> jax.Array:
        """Mean-pooled, L2-normalised sentence embeddings (B, D); for MiniLM exactly sentence-transformers' ones."""
        hidden, mask = self.encode(texts, max_len)
        m = mask[..., None].astype(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)  # (B, D)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
