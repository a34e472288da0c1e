"""Minutes-long video by repeated extension: chunk after chunk, in memory constant in the video's length.

Each chunk is one masked-video sample of the model's clip length whose first `context` latent frames are given: the
causal VAE encoding of the last 1 + tf (context - 1) pixel frames so far (extension = prefix conditioning, DESIGN.md
section 4); its other frames are new. Only those last frames are kept between chunks, and every chunk's new frames go
straight to the consumer (an mp4 stream, a drift meter), so neither device nor host memory grows with length.

Anti-drift methods (issue 16; wave2.md section 2), switchable and combinable:
  * `context_noise` s > 0: the context latents are re-noised to (1 - s) z + s e and the DiT is told their level
    (`Conditions.given_time`), so it treats the context as slightly uncertain instead of copying the accumulated
    artifacts of earlier chunks (SkyReels-V2 / CausVid noise augmentation; the model must be trained with
    `dit.context_noise`, experiments/long_video.py);
  * `decode="stream"`: against seams, only each chunk's new latents are decoded, by one causal VAE decoder whose
    frame cache carries over from chunk to chunk (the clip decodes as one continuous stream, as in causal-VAE
    streaming generation, e.g. CausVid / Self-Forcing), instead of decoding every chunk on its own;
  * `anchor="colour"`: colour coherence to the first chunk (Deforum's `color_coherence`; Reinhard et al. 2001 colour
    transfer): each new chunk's per-channel mean and standard deviation are matched to those of the first frames,
    and the corrected frames become the next context, so colour drift cannot compound; `"colour_smooth"` ramps
    the correction across each chunk from the previous chunk's, so the seam sees no jump.

A chunk's prompt can change (`prompts` as a function of the chunk index: storyboards build on it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

ANCHORS = ("none", "colour", "colour_smooth")
DECODES = ("chunk", "stream")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How chunks follow each other: latent frames of context, re-noising level, anchoring."""

    context: int = 2  # latent frames of the previous chunk given to the next (1 .. t - 1)
    context_noise: float = 0.0  # re-noising level of the context latents (needs a model trained with it)
    anchor: str = "none"  # "none" | "colour" | "colour_smooth" (the correction ramps across each chunk: no seam jump)
    # "chunk": each chunk is decoded on its own (context latents included) and its new frames kept; "stream": only the
    # new latents are decoded, by one causal decoder whose frame cache carries over from chunk to chunk.
    decode: str = "chunk"

    def __post_init__(self):
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"context_noise {self.context_noise} must be in [0, 1)")
        if self.context < 1:
            raise ValueError(f"context {self.context} must be >= 1 latent frame")

    @property
    def name(self) -> str:
        """A short label: none | renoise0.05 | colour | stream | renoise0.05+colour+stream ..."""
        parts = ([f"renoise{self.context_noise:g}"] if self.context_noise > 0 else []) + (
            [self.anchor] if self.anchor != "none" else []) + (["stream"] if self.decode == "stream" else [])
        return "+".join(parts) or "none"


def context_pixels(k: int, temporal_factor: int) -> int:
    """Pixel frames whose causal encoding is k latent frames: 1 + tf (k - 1)."""
    return 1 + temporal_factor * (k - 1)


def chunk_sizes(total: int, have: int, num_frames: int, context: int, temporal_factor: int) -> list[int]:
    """New frames of each chunk that extends `have` frames to `total` (the first chunk of a rollout from text makes
    min(total, num_frames) frames; `have` counts them)."""
    t = 1 + (num_frames - 1) // temporal_factor
    if not 1 <= context < t:
        raise ValueError(f"context {context} must be in 1..{t - 1} (latent frames of a {num_frames}-frame chunk, at "
                         "least one of them generated)")
    per = num_frames - context_pixels(context, temporal_factor)
    missing = max(0, total - have)
    return [per] * (missing // per) + ([missing % per] if missing % per else [])


def colour_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip, per-channel mean and std of uint8 frames (N, T, H, W, 3) -> (N, 3) each."""
    x = np.asarray(frames, np.float32)
    return x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))


def colour_transfer(frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-clip, per-channel affine map (scale, offset), each (N, 3), that moves the statistics of uint8 frames
    (N, T, H, W, 3) to `mean` / `std` (N, 3)."""
    m, s = colour_stats(frames)
    scale = std / np.maximum(s, 1e-3)
    return scale, mean - scale * m


def apply_colour(frames: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """uint8 frames (N, T, H, W, 3) through per-clip (N, 3) or per-frame (N, T, 3) affine colour maps."""
    if scale.ndim == 2:
        scale, offset = scale[:, None], offset[:, None]
    x = np.asarray(frames, np.float32) * scale[:, :, None, None] + offset[:, :, None, None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def match_colour(frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 frames (N, T, H, W, 3) with each clip's per-channel mean / std moved to `mean` / `std` (N, 3)."""
    return apply_colour(frames, *colour_transfer(frames, mean, std))


def ramp_colour(frames: np.ndarray, previous: tuple[np.ndarray, np.ndarray],
                target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8 frames (N, T, H, W, 3) through affine colour maps that move linearly from `previous` (the map of the
    frames before) to `target` across the T frames (frame T-1 gets `target`): no jump at the chunk's seam."""
    w = (np.arange(1, frames.shape[1] + 1, dtype=np.float32) / frames.shape[1])[None, :, None]  # (1, T, 1)
    scale = (1 - w) * previous[0][:, None] + w * target[0][:, None]  # (N, T, 3)
    offset = (1 - w) * previous[1][:, None] + w * target[1][:, None]
    return apply_colour(frames, scale, offset)


class Progress:
    """A per-chunk progress bar (tqdm: chunks done, ETA, seconds of video made so far); `quiet` silences it."""

    def __init__(self, chunks: int, fps: float, quiet: bool = False):
        self._bar = None if quiet else tqdm(total=chunks, desc="rollout", unit="chunk", mininterval=1.0)
        self.fps, self.frames = fps, 0

    def step(self, frames: int) -> None:
        self.frames += frames
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.frames / self.fps:.1f} s of video", refresh=False)
            self._bar.update(1)
            if self._bar.n == self._bar.total:
                self._bar.close()


def rollout(gen, prompts: Sequence[str] | Callable[[int], Sequence[str]], key: jax.Array, total_frames: int, *,
            start: np.ndarray | None = None, config: RolloutConfig = RolloutConfig(), fps: float = 8.0,
            quiet: bool = False, **sample_kwargs) -> Iterator[tuple[np.ndarray, bool]]:
    """Yield (uint8 frames (N, n, H, W, 3), seam) chunk by chunk until `total_frames` frames per clip.

    gen: a VideoGenerator of a masked-video DiT (its `latent_shape` fixes the chunk grid). prompts: N captions, or
    chunk index -> N captions. start: uint8 (N, T0, H, W, 3) frames to extend (yielded first, unchanged; at least
    one frame: an image starts an image-to-video rollout), None: the first chunk is generated from text with
    `jax.random.fold_in(key, 0)` -- with total_frames <= the clip length that is exactly `gen(prompts, key')`.
    seam: a chunk boundary precedes these frames. sample_kwargs go to every `gen` call (text_scale, visual_scale,
    negative_prompt). The same key and inputs give the same frames.
    """
    captions = prompts if callable(prompts) else (lambda _i, p=list(prompts): p)
    tf = gen.vae.cfg.temporal_factor
    num_frames = 1 + tf * (gen.latent_shape[0] - 1)
    n = len(captions(0))
    stream, cache = config.decode == "stream", None
    if start is None and stream:
        z = gen(captions(0), jax.random.fold_in(key, 0), batch_size=n, return_latents=True, **sample_kwargs)
        first, cache = gen.decode_step(z)
        first = first[:, :total_frames]
    elif start is None:
        first = gen(captions(0), jax.random.fold_in(key, 0), batch_size=n, **sample_kwargs)[:, :total_frames]
    else:
        first = np.asarray(start)
        if first.ndim != 5 or first.shape[0] != n or first.shape[1] < 1:
            raise ValueError(f"start must be uint8 (N={n}, T0 >= 1, H, W, 3), got {first.shape}")
    sizes = chunk_sizes(total_frames, first.shape[1], num_frames, config.context, tf)
    progress = Progress(len(sizes) + (start is None), fps, quiet)
    if start is None:
        progress.step(first.shape[1])
    anchor = colour_stats(first) if config.anchor != "none" else None
    previous = (np.ones((n, 3), np.float32), np.zeros((n, 3), np.float32))  # the first frames are not corrected
    yield first, False
    need = context_pixels(config.context, tf)
    tail = first[:, -need:]
    for i, size in enumerate(sizes, start=1):
        k = max(j for j in range(1, config.context + 1) if context_pixels(j, tf) <= tail.shape[1])
        have = context_pixels(k, tf)
        z = gen.encode(tail[:, -have:], batch_size=n)  # (N, k, h, w, C): causal, latent 0 = frame -have alone
        given = np.zeros((n, *gen.latent_shape), np.float32)
        given[:, :k] = z
        mask = np.zeros((n, *gen.latent_shape[:3]), bool)
        mask[:, :k] = True
        out = gen(captions(i), jax.random.fold_in(key, i), batch_size=n, given=given, given_mask=mask,
                  context_noise=config.context_noise, return_latents=stream, **sample_kwargs)
        if stream:  # decode the new latents only, continuing the decoder of the frames before them
            if cache is None:  # a rollout from given frames: the decoder starts on the context
                _, cache = gen.decode_step(out[:, :k])
            frames, cache = gen.decode_step(out[:, k:], cache)
            new = frames[:, :size]
        else:
            new = out[:, have:have + size]
        if config.anchor == "colour":
            new = match_colour(new, *anchor)
        elif config.anchor == "colour_smooth":
            target = colour_transfer(new, *anchor)
            new, previous = ramp_colour(new, previous, target), target
        progress.step(size)
        yield new, True
        tail = np.concatenate([tail, new], axis=1)[:, -need:]
