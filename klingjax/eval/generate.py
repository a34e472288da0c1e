"""Generation: CFG sampling of DiT latents (text, and any masked-video condition), VAE decode to uint8 clips.

`load_generator` builds one from a trained work dir (params only, no optimizer state).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from klingjax import layout
from klingjax.config import ExperimentConfig, SampleConfig
from klingjax.data.tasks import key_frame
from klingjax.diffusion import masked, samplers
from klingjax.models.conditions import CameraCondition, Conditions, MaskedVideo
from klingjax.models.text_encoders import load_text_encoder
from klingjax.train.stages import trained_dit, trained_vae


@dataclasses.dataclass(frozen=True)
class VideoGenerator:
    """A trained DiT + VAE + frozen text encoder; `__call__(captions, key)` returns uint8 (N, T, H, W, 3).

    With `given` latents and a `given_mask` the same call runs every masked-video task (image / first+last frame /
    keyframes to video, extension, inpainting, outpainting): the given positions stay exact, and guidance has a
    text scale and a visual scale (`chained_guidance`: full condition -> negative prompt with the visual condition
    -> negative prompt without it). `encode` / `encode_frames` / `decode` map pixels to the DiT's normalised latents
    and back.
    """

    dit: nnx.Module
    vae: nnx.Module
    text_encoder: object  # klingjax.models.text_encoders.FrozenTextEncoder
    latent_shape: tuple[int, int, int, int]  # (t, h, w, c)
    latent_mean: np.ndarray  # (c,)
    latent_std: np.ndarray  # (c,)
    sample: SampleConfig
    text_max_len: int
    shift: float

    def __post_init__(self):
        object.__setattr__(self, "_fn", _make_sample_fn(self))
        object.__setattr__(self, "_codec", _make_codec(self))

    @property
    def masked_video(self) -> bool:
        """Whether the DiT reads given latents (a masked-video model) or is text-to-video only."""
        return self.dit.cfg.conditions.masked_video is not MaskedVideo.OFF

    def __call__(self, captions: Sequence[str], key: jax.Array, *, batch_size: int = 16,
                 negative_prompt: str | None = None, dit: nnx.Module | None = None, given: np.ndarray | None = None,
                 given_mask: np.ndarray | None = None, text_scale: float | None = None,
                 visual_scale: float | None = None, camera: np.ndarray | None = None,
                 context_noise: float = 0.0, return_latents: bool = False) -> np.ndarray:
        """Generate one clip per caption (batched); the same key and inputs give the same clips.

        given: (N, t, h, w, C) normalised latents (`encode` / `encode_frames`), given_mask: (N, t, h, w) bool, True =
        given (kept exact); both None: text-to-video. text_scale / visual_scale default to the sample config's
        `cfg_scale` / `visual_cfg_scale`. `dit` swaps in other params of the same architecture (e.g. the EMA model
        during training) without recompiling: params are arguments of the compiled sampler. camera: (N, t, 4) camera
        path per latent frame (`Conditions.camera`), for a DiT with a camera adapter (None: a static camera).
        context_noise: s > 0 re-noises the given latents to (1 - s) given + s e and tells the DiT their level
        (`Conditions.given_time`; a model trained with `dit.context_noise`), an anti-drift measure of long rollouts
        (klingjax/eval/rollout.py); the clean given latents are put back before decoding.
        return_latents: the sampled normalised latents (N, t, h, w, C) instead of frames (`decode_step` decodes them
        with a decoder state carried across calls).
        """
        neg = self.sample.negative_prompt if negative_prompt is None else negative_prompt
        scales = (float(self.sample.cfg_scale if text_scale is None else text_scale),
                  float(self.sample.visual_cfg_scale if visual_scale is None else visual_scale))
        if (given is None) != (given_mask is None):
            raise ValueError("pass given latents and given_mask together (or neither: text-to-video)")
        if given is not None:
            if not self.masked_video:
                raise ValueError("this DiT has no masked-video conditioning (conditions.masked_video=off): it cannot "
                                 "take given latents (image / video conditions)")
            want = (len(captions), *self.latent_shape)
            if tuple(given.shape) != want or tuple(given_mask.shape) != want[:4]:
                raise ValueError(f"given latents must be {want} and given_mask {want[:4]}; got "
                                 f"{tuple(given.shape)} and {tuple(given_mask.shape)}")
        if not 0.0 <= context_noise < 1.0:
            raise ValueError(f"context_noise {context_noise} must be in [0, 1)")
        if context_noise > 0 and (given is None or
                                  self.dit.cfg.conditions.masked_video is not MaskedVideo.PER_TOKEN_TIMESTEPS):
            raise ValueError("context_noise re-noises given latents: it needs given latents and a DiT with "
                             "conditions.masked_video=per_token_timesteps (trained with dit.context_noise)")
        if camera is not None:
            if self.dit.cfg.conditions.camera is CameraCondition.OFF:
                raise ValueError("this DiT has no camera adapter (conditions.camera=off): it takes camera moves as "
                                 "caption words only")
            want = (len(captions), self.latent_shape[0], 4)
            if tuple(np.shape(camera)) != want:
                raise ValueError(f"camera must be {want} (one path row per latent frame), got {np.shape(camera)}")
        dit_state = nnx.state(self.dit if dit is None else dit)
        out = []
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start:start + batch_size])
            n = len(chunk)
            chunk += [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compilation
            cond = Conditions(*self.text_encoder.encode(chunk, self.text_max_len))
            uncond = Conditions(*self.text_encoder.encode([neg] * batch_size, self.text_max_len))  # negative prompt
            if camera is not None:  # the camera is no guided condition: both branches see it
                path = jnp.asarray(_pad(np.asarray(camera[start:start + batch_size], np.float32), batch_size))
                cond, uncond = cond.replace(camera=path), uncond.replace(camera=path)
            noise = jax.random.normal(jax.random.fold_in(key, start), (batch_size, *self.latent_shape))
            visual = None
            if given is not None:
                visual = tuple(jnp.asarray(_pad(a[start:start + batch_size], batch_size)) for a in (given, given_mask))
            if context_noise > 0:  # (noisy given, mask, clean given); the DiT told the level
                level = jnp.full((batch_size,), context_noise, jnp.float32)
                cond, uncond = cond.replace(given_time=level), uncond.replace(given_time=level)
                e = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, start), 1), noise.shape)
                visual = ((1.0 - context_noise) * visual[0] + context_noise * e, visual[1], visual[0])
            videos = self._fn(dit_state, nnx.state(self.vae), cond, uncond, noise, visual, scales=scales,
                              decode=not return_latents)
            # The batch may span other processes' devices: gather it (a collective every process joins).
            out.append(np.asarray(multihost_utils.process_allgather(videos, tiled=True))[:n])
        return np.concatenate(out, axis=0)

    def encode(self, videos: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
        """uint8 clips (N, T, H, W, 3) -> the DiT's normalised latents (N, t, h, w, C) of each whole clip (causal:
        latent frames 0..k depend only on pixel frames 0..4k)."""
        return self._batched(self._codec["encode"], videos, batch_size)

    def encode_frames(self, videos: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
        """uint8 clips (N, T, H, W, 3) -> (N, t, h, w, C): latent frame j = pixel key frame j (`tasks.key_frame`)
        encoded alone, the latents of a last-frame / keyframe / suffix condition."""
        tf = self.vae.cfg.temporal_factor
        keys = [key_frame(j, tf) for j in range(1 + (videos.shape[1] - 1) // tf)]
        singles = np.asarray(videos)[:, keys].reshape(-1, 1, *videos.shape[2:])  # (N*t, 1, H, W, 3)
        z = self.encode(singles, batch_size=batch_size * len(keys))  # (N*t, 1, h, w, C)
        return z.reshape(len(videos), len(keys), *z.shape[2:])

    def decode(self, latents: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
        """Normalised latents (N, t, h, w, C) -> uint8 clips (N, T, H, W, 3)."""
        return self._batched(self._codec["decode"], latents, batch_size)

    def decode_step(self, latents: np.ndarray, cache=None) -> tuple[np.ndarray, object]:
        """Streaming decode: normalised latents (N, n, h, w, C) that continue the latents of the call that returned
        `cache` (None: they start a clip, latent frame 0 -> 1 frame) -> (uint8 frames (N, n' , H, W, 3), the new
        decoder cache). Chunk after chunk this decodes one continuous clip: the causal decoder's frame cache carries
        over, so no chunk boundary reaches the pixels (klingjax/eval/rollout.py's `decode="stream"`)."""
        frames, cache = self._codec["decode_step"](nnx.state(self.vae), jnp.asarray(latents), cache)
        return np.asarray(multihost_utils.process_allgather(frames, tiled=True)), cache

    def _batched(self, fn, x: np.ndarray, batch_size: int) -> np.ndarray:
        x = np.asarray(x)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            y = fn(nnx.state(self.vae), jnp.asarray(_pad(chunk, batch_size)))
            out.append(np.asarray(multihost_utils.process_allgather(y, tiled=True))[:len(chunk)])
        return np.concatenate(out, axis=0)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """`a` (k <= n, ...) padded to n rows by repeating its last row."""
    a = np.asarray(a)
    return a if len(a) == n else np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


def _make_codec(gen: VideoGenerator) -> dict:
    vae_def = nnx.graphdef(gen.vae)
    mean, std = jnp.asarray(gen.latent_mean), jnp.asarray(gen.latent_std)

    @jax.jit
    def encode(vae_state, videos):
        z, _ = nnx.merge(vae_def, vae_state).encode_streaming(videos.astype(jnp.float32) / 127.5 - 1.0)
        return (z - mean) / std

    @jax.jit
    def decode(vae_state, z):
        return _to_uint8(nnx.merge(vae_def, vae_state).decode_streaming(z * std + mean))

    @jax.jit
    def decode_step(vae_state, z, cache):
        frames, cache = nnx.merge(vae_def, vae_state).decode_chunk(z * std + mean, cache)
        return _to_uint8(frames), cache

    return {"encode": encode, "decode": decode, "decode_step": decode_step}


def _to_uint8(x: jax.Array) -> jax.Array:
    return jnp.round((x + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)


def _make_sample_fn(gen: VideoGenerator):
    dit_def, vae_def = nnx.graphdef(gen.dit), nnx.graphdef(gen.vae)
    cfg = gen.sample
    mean = jnp.asarray(gen.latent_mean)
    std = jnp.asarray(gen.latent_std)
    shift = cfg.shift if cfg.shift > 0 else gen.shift

    @functools.partial(jax.jit, static_argnames=("scales", "decode"))
    def fn(dit_state, vae_state, cond: Conditions, uncond: Conditions, noise, visual, *, scales, decode=True):
        vae = nnx.merge(vae_def, vae_state)
        text_scale, visual_scale = scales

        def velocity(x, t, dit_state, t_next=None):
            # Params ride in the sampler's loop carry and the module is merged inside the loop body:
            # NNX modules must live at the trace level they run in.
            dit = nnx.merge(dit_def, dit_state)
            c, u = cond, uncond
            if t_next is not None:  # Sampler.FLOW_MAP: a flow-map student predicts the average velocity to t_next
                jump = jnp.full((x.shape[0],), t - t_next, jnp.float32)
                c, u = c.replace(interval=jump), u.replace(interval=jump)
            if visual is not None:
                given = dict(given=visual[0], given_mask=visual[1])
                c, u = c.replace(**given), u.replace(**given)
            model = lambda x, t, c: dit(x, t * 1000.0, c)  # noqa: E731 - t (B,) in [0, 1] -> timesteps [0, 1000]
            return masked.guided_velocity(model, x, jnp.full((x.shape[0],), t, x.dtype), c, u, text_scale,
                                          visual_scale, noise)

        if visual is None:
            z = samplers.sample(velocity, noise, num_steps=cfg.num_steps, sampler=cfg.sampler, shift=shift,
                                args=(dit_state,))
        else:
            z = masked.sample_masked(velocity, noise, *visual[:2], num_steps=cfg.num_steps, sampler=cfg.sampler,
                                     shift=shift, args=(dit_state,))
            if len(visual) == 3:  # re-noised given latents: decode the clean ones
                z = masked.apply_given(z, visual[2], visual[1])
        if not decode:
            return z  # normalised latents
        z = z * std + mean  # back to the VAE's latent scale
        return _to_uint8(vae.decode_streaming(z))  # (B, T, H, W, 3); constant memory in T

    return fn


def load_generator(exp: ExperimentConfig, workdir: str, mesh: jax.sharding.Mesh, *, text_encoder=None,
                   dit: nnx.Module | None = None, student: bool = False) -> VideoGenerator:
    """The trained DiT (EMA if `sample.use_ema`) + VAE (EMA) + text encoder of `workdir` as a VideoGenerator.

    Params only: the models are built abstractly and restored without optimizer state. `dit` (e.g. the model
    being trained) replaces the DiT checkpoint; `text_encoder` an already loaded encoder. `student`: the distill
    stage's few-step student (its EMA) with its own sampling (`distill.student_sample_config`: guidance 1, its step
    count and solver); a `dit` passed in is then a student too.
    """
    from klingjax.train import distill

    text_encoder = text_encoder if text_encoder is not None else load_text_encoder(exp.text_encoder)
    vae = trained_vae(exp, workdir, mesh)
    if dit is None and student:
        dit = distill.trained_student(exp, workdir, mesh, text_dim=text_encoder.dim, use_ema=exp.sample.use_ema)
    elif dit is None:
        dit = trained_dit(exp, workdir, mesh, text_dim=text_encoder.dim, use_ema=exp.sample.use_ema)
    mean, std = layout.load_latent_stats(workdir)
    return VideoGenerator(dit=dit, vae=vae, text_encoder=text_encoder, latent_shape=layout.latent_grid(exp),
                          latent_mean=mean, latent_std=std,
                          sample=distill.student_sample_config(exp) if student else exp.sample,
                          text_max_len=exp.text_max_len, shift=layout.train_shift(exp))


def load_workdir_generator(workdir: str, *, student: bool = False) -> tuple[ExperimentConfig, VideoGenerator]:
    """(config, generator) of a finished experiment work dir, from its `config.json` and checkpoints (`student`:
    its distilled few-step student)."""
    from klingjax.sharding.mesh import make_mesh

    exp = layout.load_workdir_config(workdir)
    return exp, load_generator(exp, workdir, make_mesh(exp.mesh.sizes), student=student)
