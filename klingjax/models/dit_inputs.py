"""What every DiT block reads besides its tokens: one `BlockInputs` tuple, built once per forward pass by the DiT's
condition step and broadcast unchanged to all blocks (one argument of the layer scan, whatever the conditions).

Masked video (conditions.MaskedVideo) lives here too: which tokens are given (`given_tokens`), the per-token
modulation of PER_TOKEN_TIMESTEPS (`modulation_chunks`) and the extra patch-embedding input of CHANNEL_CONCAT
(`channel_condition`).
Neighbours: models/dit.py (builds it in `WanDiT.block_inputs`, reads it in `DiTBlock`), models/conditions.py
(what it is built from), layers/rope.py (the tables), diffusion/masked.py (the same masks in loss and sampler).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from klingjax.diffusion.masked import given_positions
from klingjax.models.layers.embeddings import Patch, patchify
from klingjax.models.layers.rope import rope_3d, rope_from_positions

FACTORIZED_POSITIONS_ERROR = (
    "Conditions.positions is not supported with attention_layout=factorized yet (its spatial and temporal tables "
    "assume the latent grid); drop the positions or use attention_layout=joint_3d")

Tables = tuple[jax.Array, jax.Array]  # (cos, sin), each (n, K/2) or per example (B, n, K/2)


class RopeTables(NamedTuple):
    """(cos, sin) tables of every self-attention a block runs."""

    q: Tables  # queries: JOINT_3D ([B,] N, K/2); FACTORIZED spatial (h*w, K/2)
    k: Tables  # keys: q's rows, then L identity rows (cos 1, sin 0) for JOINT text keys
    temporal: Tables | None  # FACTORIZED temporal attention (t, K/2); else None


class BlockInputs(NamedTuple):
    """Everything a DiT block reads besides its tokens x (B, N, D); new conditions fill fields, not signatures.

    A condition that needs more (reference or audio keys/values in self-attention) adds a field here, defaulting
    to None, and the block reads it; the scan passes the whole tuple, so neither the scan nor callers change.
    """

    context: jax.Array  # (B, L, D) projected text
    context_mask: jax.Array | None  # (B, N|1, L) bool: query n may read text token l; (B, 1, L) = every query alike
    modulation: jax.Array  # (B, 6, D) float32: the shared time projection, before each block's table
    rope: RopeTables
    # PER_TOKEN_TIMESTEPS: tokens where given_tokens (B, N, 1) is True are modulated by given_modulation (B, 6, D),
    # the time projection of t = 0, instead of `modulation`; None = every token uses `modulation`.
    given_tokens: jax.Array | None = None
    given_modulation: jax.Array | None = None
    # ConditionSpec.camera: the camera embedding of each token's latent frame (B, N, D); None = no camera.
    camera: jax.Array | None = None


def given_tokens(given_mask: jax.Array, patch: Patch) -> jax.Array:
    """(B, t, h, w) latent "given" mask -> (B, N, 1) bool: a token is given iff every latent position of its patch is.

    A patch that is only partly given is generated (its timestep stays t), so no noisy position is ever treated as
    clean; masks aligned to the patch grid (whole latent frames with pt = 1, boxes on even rows and columns with
    (ph, pw) = (2, 2)) make the two views agree exactly.
    """
    m = patchify(given_positions(given_mask)[..., None], patch)  # (B, T, H, W, pt*ph*pw)
    return jnp.all(m, axis=-1).reshape(m.shape[0], -1, 1)  # (B, N, 1)


def modulation_chunks(table: jax.Array, modulation: jax.Array, given_modulation: jax.Array | None = None,
                      given: jax.Array | None = None) -> list[jax.Array]:
    """A modulated layer's k vectors: table (1, k, D) + modulation (B, k, D) -> k x (B, 1, D).

    With per-token timesteps (given (B, N, 1) and given_modulation (B, k, D), the t = 0 modulation), given tokens
    take table + given_modulation: k x (B, N, D). Without, the values are exactly those of the plain model.
    """
    k = table.shape[1]
    chunks = jnp.split(table + modulation, k, axis=1)  # k x (B, 1, D)
    if given is None:
        return chunks
    clean = jnp.split(table + given_modulation, k, axis=1)  # k x (B, 1, D)
    return [jnp.where(given, c, g) for c, g in zip(clean, chunks)]  # k x (B, N, D)


def channel_condition(given: jax.Array | None, given_mask: jax.Array | None, latents: jax.Array) -> jax.Array:
    """CHANNEL_CONCAT's extra input [given * mask, mask] (B, t, h, w, C + 1); zeros when nothing is given."""
    if given_mask is None:
        return jnp.zeros((*latents.shape[:-1], latents.shape[-1] + 1), latents.dtype)
    m = given_positions(given_mask)[..., None]  # (B, t, h, w, 1) bool
    masked = jnp.where(m, given.astype(latents.dtype), 0)  # where, not *: values at generated positions never leak
    return jnp.concatenate([masked, m.astype(latents.dtype)], axis=-1)  # (B, t, h, w, C + 1)


def block_rope(grid: tuple[int, int, int], head_dim: int, theta: float, *, factorized: bool,
               text_len: int | None, positions: jax.Array | None = None) -> RopeTables:
    """The RoPE tables of a (t, h, w) token grid, sliced for the blocks' attentions.

    factorized: FACTORIZED layout (spatial tables per frame + temporal tables). text_len: JOINT text keys to
    append as identity rows (None: CROSS text). positions: (B, N, 3) per-token positions, None = the grid.
    """
    t, h, w = grid
    if positions is None:
        cos, sin = rope_3d(grid, head_dim, theta)  # 2 x (N, K/2), N = t*h*w row-major
    elif factorized:
        raise ValueError(FACTORIZED_POSITIONS_ERROR)
    else:
        cos, sin = rope_from_positions(positions, head_dim, theta)  # 2 x (B, N, K/2)
    temporal = None
    if factorized:
        cos, sin = cos.reshape(t, h * w, -1), sin.reshape(t, h * w, -1)  # 2 x (t, h*w, K/2)
        # Frame 0 has temporal angle 0, so its rows are the pure (h, w) table; location (0, 0) has zero
        # spatial angles, so its column is the pure temporal table.
        temporal = (cos[:, 0], sin[:, 0])  # 2 x (t, K/2)
        cos, sin = cos[0], sin[0]  # 2 x (h*w, K/2)
    keys = (cos, sin)
    if text_len is not None:
        pad = [(0, 0)] * (cos.ndim - 2) + [(0, text_len), (0, 0)]
        keys = (jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad))  # 2 x ([B,] n + L, K/2)
    return RopeTables((cos, sin), keys, temporal)


def joint_kv_mask(context_mask: jax.Array | None, frames: int, seq: int) -> jax.Array | None:
    """JOINT text: the key mask over [video; text] of each attended sequence of `seq` tokens (B*frames of them).

    context_mask (B, N|1, L) -> (B*frames, seq|1, seq + L): video keys always, text keys where the mask allows.
    """
    if context_mask is None:
        return None
    b, q, _ = context_mask.shape
    if q == 1:
        text = jnp.repeat(context_mask, frames, axis=0)  # (B*t, 1, L)
    else:
        text = context_mask.reshape(b * frames, seq, -1)  # (B*t, h*w, L); token order is (t, h, w) row-major
    video = jnp.ones((b * frames, text.shape[1], seq), bool)  # (B*t, seq|1, seq)
    return jnp.concatenate([video, text], axis=-1)  # (B*t, seq|1, seq + L)
