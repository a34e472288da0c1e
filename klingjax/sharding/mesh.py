"""Device mesh construction from config sizes, over the fixed axes ('data', 'fsdp', 'context', 'tensor')."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType

from klingjax.sharding.rules import MESH_AXES


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill in at most one -1 so the product equals `num_devices`; raise a clear error otherwise."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (auto)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: fixed axes multiply to {known}, "
                f"which does not divide the {num_devices} available devices"
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
            f"but {num_devices} devices are available (set one axis to -1 to fill automatically)"
        )
    return sizes


def make_mesh(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Build a mesh with the fixed axis names and Auto axis types (GSPMD propagates inside jit)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
