"""What the DiT is conditioned on: `Conditions` (one pytree, carried by batches and generation requests) and
`ConditionSpec` (static, in `DiTConfig`: which conditions a model accepts and what parameters they add).

Every Kling capability is a condition on the same DiT (DESIGN.md section 4), so all of them travel in this one
pytree instead of new arguments threaded through the trainer, sampler, eval and export. This module holds the
text fields only. Later capabilities add fields here, each defaulting to None, and None always means "absent":
given latents + a per-token "given" mask (image / video / first-last-frame to video), per-token timesteps,
reference latents + their positions, camera parameters per frame, a shot index per token (multi-shot captions),
audio tokens. Neighbours: models/dit.py (its condition step turns Conditions into the blocks' `BlockInputs`),
diffusion/guidance.py (CFG over any pair of condition pytrees).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Conditions:
    """The conditions of a batch of B clips; a field left None is absent.

    text: (B, L, text_dim) text-encoder hidden states.
    text_mask: (B, L) bool, True = real token; None = every token is real.
    positions: (B, N, 3) float or int RoPE positions (t, h, w) of the N video tokens, in token-grid units (one
        latent frame / patch row / patch column = 1); None = the latent grid itself (Wan T2V).
    """

    text: jax.Array
    text_mask: jax.Array | None = None
    positions: jax.Array | None = None

    def concat(self, other: Conditions) -> Conditions:
        """[self; other] along the batch (CFG batching); each field must be present in both or in neither."""
        fields = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate Conditions: {f.name} is present in one and None in the other")
            fields[f.name] = None if a is None else jnp.concatenate([a, b])
        return Conditions(**fields)


# Conditions field -> the ConditionSpec switch that must be on for a batch to carry it (None: every DiT reads it).
# Each new Conditions field is registered here with its switch (e.g. "camera_frames": "camera").
_FIELD_SWITCHES: dict[str, str | None] = {"text": None, "text_mask": None, "positions": None}


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """Which conditions a `WanDiT` accepts and the (zero-initialised) parameters they add; static, in DiTConfig.

    `ConditionSpec()` is Wan 2.1 T2V exactly: text (+ mask) read by cross-attention, optional per-token RoPE
    positions, no extra parameters, so the diffusers export and the parity tests are unchanged. Later issues add
    switches here, all off by default:
      * masked video (image / video / first-last-frame to video): per-token timesteps, given tokens kept at t = 0
        (Wan 2.2 TI2V, LTX), or channel concat of the given latents + mask (Wan 2.1 I2V, Open-Sora 2.0);
      * camera control: a camera adapter reading per-frame camera parameters;
      * multi-shot: per-shot captions and a shot index per token (per-query cross-attention masks);
      * references: extra clean tokens with positions outside the clip (extra keys/values);
      * audio: a second token stream with time-aligned positions.
    """

    def validate(self, cond: Conditions, num_tokens: int | None = None) -> None:
        """Raise ValueError if `cond` carries a field this spec does not enable or its shapes disagree.

        num_tokens: N, the video tokens the positions must cover (None: not checked).
        """
        for f in dataclasses.fields(cond):
            if getattr(cond, f.name) is None:
                continue
            if f.name not in _FIELD_SWITCHES:
                raise ValueError(f"Conditions.{f.name} has no entry in conditions._FIELD_SWITCHES; register it")
            switch = _FIELD_SWITCHES[f.name]
            if switch is not None and not getattr(self, switch):
                raise ValueError(f"the batch carries Conditions.{f.name} but this DiT's ConditionSpec has "
                                 f"{switch}=False: enable it in the model config or drop the field")
        if cond.text is None or cond.text.ndim != 3:
            raise ValueError(f"Conditions.text must be (B, L, text_dim), got {getattr(cond.text, 'shape', None)}")
        b, seq = cond.text.shape[:2]
        if cond.text_mask is not None and cond.text_mask.shape != (b, seq):
            raise ValueError(f"Conditions.text_mask must be (B, L) = {(b, seq)}, got {cond.text_mask.shape}")
        if cond.positions is not None:
            want = (b, cond.positions.shape[1] if num_tokens is None else num_tokens, 3)
            if cond.positions.shape != want:
                raise ValueError(f"Conditions.positions must be (B, N, 3) = {want}, got {cond.positions.shape}")
