"""What the DiT is conditioned on: `Conditions` (one pytree, carried by batches and generation requests) and
`ConditionSpec` (static, in `DiTConfig`: which conditions a model accepts and what parameters they add).

Every Kling capability is a condition on the same DiT (DESIGN.md section 4), so all of them travel in this one
pytree instead of new arguments threaded through the trainer, sampler, eval and export. It holds the text fields,
the masked-video fields (given latents + a "given" mask: image / first-last-frame / keyframes to video,
extension, inpainting) and the camera path per latent frame (camera control). Later capabilities add fields here,
each defaulting to None, and None always means "absent": reference latents + their positions, a shot index per
token (multi-shot captions), audio tokens. Neighbours: models/dit.py (its condition step turns Conditions into the
blocks' `BlockInputs`), diffusion/guidance.py (CFG over any pair of condition pytrees), diffusion/masked.py (keeping
given latents clean in the loss and the sampler), data/tasks.py (the mask patterns of each task).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

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
    given: (B, t, h, w, C) clean latents of the given positions (values elsewhere are ignored); None = none.
    given_mask: (B, t, h, w) bool or float, True / >= 0.5 = this latent position is given (kept clean, not
        generated); None = every position is generated (T2V). Needs `ConditionSpec.masked_video` on.
    given_time: (B,) float in [0, 1), the noise level of the given latents (context re-noising against drift in long
        rollouts, noise augmentation in training): given positions hold (1 - s) z + s e and their tokens are modulated
        at timestep s instead of 0; None = clean (0). Needs `ConditionSpec.masked_video` = per_token_timesteps.
    camera: (B, t, 4) float camera path of each latent frame, (oy, ox, log_scale, roll) relative to frame 0
        (klingjax/data/synthetic/camera.py; a latent frame reads its last pixel frame's row). Needs
        `ConditionSpec.camera` on.
    interval: (B,) float in [0, 1], the jump h = t - r of a flow-map (MeanFlow) student: it predicts the average
        velocity from t to r = t - h (0 = the instantaneous velocity). Needs `ConditionSpec.flow_map` on.
    """

    text: jax.Array
    text_mask: jax.Array | None = None
    positions: jax.Array | None = None
    given: jax.Array | None = None
    given_mask: jax.Array | None = None
    given_time: jax.Array | None = None
    camera: jax.Array | None = None
    interval: jax.Array | None = None

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
_FIELD_SWITCHES: dict[str, str | None] = {"text": None, "text_mask": None, "positions": None,
                                          "given": "masked_video", "given_mask": "masked_video",
                                          "given_time": "masked_video", "camera": "camera",
                                          "interval": "flow_map"}


class MaskedVideo(enum.Enum):
    """How a DiT reads given (clean) latents: the masked-video tasks (I2V, first+last frame, extension, inpainting).

    Either way the caller keeps the given positions clean in the model input and out of the loss
    (diffusion/masked.py); the model only decides how it is told which positions are given.
    """

    OFF = "off"  # text-to-video only (Wan 2.1 T2V); Conditions.given / given_mask are rejected
    # Wan 2.2 TI2V / LTX: tokens whose whole patch is given get timestep 0 (their own time modulation, in every
    # block and the final layer); no new parameters, so a T2V checkpoint is the starting point as is.
    PER_TOKEN_TIMESTEPS = "per_token_timesteps"
    # Wan 2.1 I2V / Open-Sora 2.0: the patch embedding also reads [given * mask, mask] (C + 1 channels) through a
    # zero-initialised kernel `patch_embedding.cond_kernel`, so at init the model is the T2V model it starts from.
    CHANNEL_CONCAT = "channel_concat"


class CameraCondition(enum.Enum):
    """Where a DiT reads `Conditions.camera`: a shared camera embedder (per latent frame: 4 -> D -> D) feeds, at the
    input of each chosen block, a zero-initialised per-block projection added to that frame's tokens (so at init the
    model is the text-to-video model it starts from). Text-only camera control (caption words) needs none of it."""

    OFF = "off"
    ALL_BLOCKS = "all_blocks"  # every block (CameraCtrl / MotionCtrl style)
    FIRST_BLOCKS = "first_blocks"  # only the first `camera_blocks` blocks (AC3D: camera is decided early)


def _switch_on(value: Any) -> bool:
    """A ConditionSpec switch is on unless it is False / None or an enum's OFF member."""
    return value is not None and value is not False and getattr(value, "name", None) != "OFF"


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """Which conditions a `WanDiT` accepts and the (zero-initialised) parameters they add; static, in DiTConfig.

    `ConditionSpec()` is Wan 2.1 T2V exactly: text (+ mask) read by cross-attention, optional per-token RoPE
    positions, no extra parameters, so the diffusers export and the parity tests are unchanged. Later issues add
    switches here, all off by default:
      * `masked_video` (image / video / first-last-frame to video, extension, inpainting; see `MaskedVideo`):
        per-token timesteps, given tokens kept at t = 0 (Wan 2.2 TI2V, LTX), or channel concat of the given
        latents + mask (Wan 2.1 I2V, Open-Sora 2.0);
      * `camera` (camera control, see `CameraCondition`): a camera embedder + zero-initialised per-block adapters
        reading `Conditions.camera`, in every block or the first `camera_blocks`;
      * `flow_map` (few-step students, train/distill.py): the jump length `Conditions.interval` of an
        average-velocity (MeanFlow) model, through a zero-initialised embedding added to the time embedding;
    and later:
      * multi-shot: per-shot captions and a shot index per token (per-query cross-attention masks);
      * references: extra clean tokens with positions outside the clip (extra keys/values);
      * audio: a second token stream with time-aligned positions.
    """

    masked_video: MaskedVideo = MaskedVideo.OFF
    camera: CameraCondition = CameraCondition.OFF
    camera_blocks: int = 2  # FIRST_BLOCKS: how many blocks read the camera
    # A flow-map student (the distill stage's mean_flow method): `Conditions.interval` -> a zero-initialised
    # embedding added to the time embedding (models/layers/adapters.py), so at init it is the model it starts from.
    flow_map: bool = False

    def __post_init__(self):
        if not isinstance(self.masked_video, MaskedVideo):
            raise TypeError(f"ConditionSpec.masked_video must be a MaskedVideo, got {self.masked_video!r}")
        if not isinstance(self.camera, CameraCondition):
            raise TypeError(f"ConditionSpec.camera must be a CameraCondition, got {self.camera!r}")
        if not isinstance(self.flow_map, bool):
            raise TypeError(f"ConditionSpec.flow_map must be a bool, got {self.flow_map!r}")
        if self.camera_blocks < 1:
            raise ValueError(f"ConditionSpec.camera_blocks must be >= 1, got {self.camera_blocks}")

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> ConditionSpec:
        """A spec from config values (enum switches also take their string values, e.g. "channel_concat")."""
        values = dict(values)
        for key, kind in (("masked_video", MaskedVideo), ("camera", CameraCondition)):
            if isinstance(values.get(key), str):
                try:
                    values[key] = kind(values[key])
                except ValueError:
                    raise ValueError(f"conditions.{key}: {values[key]!r} is not one of "
                                     f"{[m.value for m in kind]}") from None
        if unknown := sorted(set(values) - {f.name for f in dataclasses.fields(cls)}):
            raise ValueError(f"conditions: unknown key(s) {unknown}")
        return cls(**values)

    def patch_channels(self, in_channels: int) -> int:
        """Channels the patch embedding reads: the latents' C, plus C + 1 ([given * mask, mask]) for CHANNEL_CONCAT."""
        return 2 * in_channels + 1 if self.masked_video is MaskedVideo.CHANNEL_CONCAT else in_channels

    def validate(self, cond: Conditions, num_tokens: int | None = None,
                 latent_shape: tuple[int, ...] | None = None) -> None:
        """Raise ValueError if `cond` carries a field this spec does not enable or its shapes disagree.

        num_tokens: N, the video tokens the positions must cover; latent_shape: (B, t, h, w, C) of the latents the
        given fields must match (None: not checked).
        """
        for f in dataclasses.fields(cond):
            if getattr(cond, f.name) is None:
                continue
            if f.name not in _FIELD_SWITCHES:
                raise ValueError(f"Conditions.{f.name} has no entry in conditions._FIELD_SWITCHES; register it")
            switch = _FIELD_SWITCHES[f.name]
            value = None if switch is None else getattr(self, switch)
            if switch is not None and not _switch_on(value):
                raise ValueError(f"the batch carries Conditions.{f.name} but this DiT's ConditionSpec has "
                                 f"{switch}={getattr(value, 'value', value)}: enable it in the model config or drop "
                                 "the field")
        if cond.text is None or cond.text.ndim != 3:
            raise ValueError(f"Conditions.text must be (B, L, text_dim), got {getattr(cond.text, 'shape', None)}")
        b, seq = cond.text.shape[:2]
        if cond.text_mask is not None and cond.text_mask.shape != (b, seq):
            raise ValueError(f"Conditions.text_mask must be (B, L) = {(b, seq)}, got {cond.text_mask.shape}")
        if cond.positions is not None:
            want = (b, cond.positions.shape[1] if num_tokens is None else num_tokens, 3)
            if cond.positions.shape != want:
                raise ValueError(f"Conditions.positions must be (B, N, 3) = {want}, got {cond.positions.shape}")
        self._validate_given(cond, b, latent_shape)
        if cond.interval is not None and tuple(cond.interval.shape) != (b,):
            raise ValueError(f"Conditions.interval must be (B,) = {(b,)}, got {tuple(cond.interval.shape)}")
        if cond.camera is not None:
            t = latent_shape[1] if latent_shape is not None else cond.camera.shape[1]
            if tuple(cond.camera.shape) != (b, t, 4):
                raise ValueError(f"Conditions.camera must be (B, t, 4) = {(b, t, 4)}, got {tuple(cond.camera.shape)}")

    def _validate_given(self, cond: Conditions, b: int, latent_shape: tuple[int, ...] | None) -> None:
        """The masked-video fields: the mask (B, t, h, w) and given (B, t, h, w, C) match the latents."""
        given, mask = cond.given, cond.given_mask
        if given is not None and mask is None:
            raise ValueError("Conditions.given needs Conditions.given_mask (which latent positions are given)")
        if mask is None:
            return
        if cond.given_time is not None:
            if self.masked_video is not MaskedVideo.PER_TOKEN_TIMESTEPS:
                raise ValueError("Conditions.given_time (noisy given latents) needs masked_video=per_token_timesteps: "
                                 "the given tokens' own timestep tells the model their noise level")
            if tuple(cond.given_time.shape) != (b,):
                raise ValueError(f"Conditions.given_time must be (B,) = {(b,)}, got {tuple(cond.given_time.shape)}")
        if self.masked_video is MaskedVideo.CHANNEL_CONCAT and given is None:
            raise ValueError("masked_video=channel_concat reads Conditions.given: set it with the given_mask")
        want = (b, *latent_shape[1:4]) if latent_shape is not None else (b, *mask.shape[1:])
        if mask.ndim != 4 or tuple(mask.shape) != want:
            raise ValueError(f"Conditions.given_mask must be (B, t, h, w) = {want}, got {mask.shape}")
        if given is not None:
            want = tuple(latent_shape) if latent_shape is not None else (*mask.shape, given.shape[-1])
            if given.ndim != 5 or tuple(given.shape) != want:
                raise ValueError(f"Conditions.given must be (B, t, h, w, C) = {want}, got {given.shape}")
