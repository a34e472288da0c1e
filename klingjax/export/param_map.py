"""Declarative parameter maps between klingjax (Flax NNX) and diffusers (PyTorch) state dicts.

A model's map is a short, ordered table of `Rule`s (first match wins): a regex over the dotted klingjax
parameter path, the diffusers name it becomes (regex backreferences, plus `{layer}` for blocks stacked on a
leading "layers" axis), and a `Layout` saying how the array is transposed or reshaped. `expand` applies the
table to a model's abstract parameters and returns one `Entry` per torch tensor, so a map is checked for
coverage (every parameter mapped exactly once, every name unique) before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
from flax import nnx


class Layout(enum.Enum):
    """How one klingjax array relates to its torch tensor."""

    SAME = "same"  # identical shape and element order
    LINEAR = "linear"  # kernel (in, out) <-> Linear.weight (out, in)
    CONV2D = "conv2d"  # kernel (kh, kw, in, out) <-> Conv2d.weight (out, in, kh, kw)
    CONV3D = "conv3d"  # kernel (kt, kh, kw, in, out) <-> Conv3d.weight (out, in, kt, kh, kw)
    GAMMA_2D = "gamma_2d"  # (C,) <-> (C, 1, 1): Wan RMS-norm scale over images
    GAMMA_3D = "gamma_3d"  # (C,) <-> (C, 1, 1, 1): Wan RMS-norm scale over videos


# klingjax axis order -> torch axis order, for layouts that transpose.
_TO_TORCH_AXES = {Layout.LINEAR: (1, 0), Layout.CONV2D: (3, 2, 0, 1), Layout.CONV3D: (4, 3, 0, 1, 2)}
_GAMMA_ONES = {Layout.GAMMA_2D: 2, Layout.GAMMA_3D: 3}


def torch_shape(shape: Sequence[int], layout: Layout) -> tuple[int, ...]:
    """Shape of the torch tensor for a klingjax array of `shape`."""
    shape = tuple(shape)
    if layout in _TO_TORCH_AXES:
        axes = _TO_TORCH_AXES[layout]
        if len(shape) != len(axes):
            raise ValueError(f"layout {layout.value} expects a rank-{len(axes)} array, got shape {shape}")
        return tuple(shape[a] for a in axes)
    if layout in _GAMMA_ONES:
        if len(shape) != 1:
            raise ValueError(f"layout {layout.value} expects a (C,) array, got shape {shape}")
        return shape + (1,) * _GAMMA_ONES[layout]
    return shape


def torch_axes(layout: Layout) -> tuple[int, ...] | None:
    """The transpose taking a klingjax array to torch layout (None: no transpose; gammas only reshape)."""
    return _TO_TORCH_AXES.get(layout)


def to_torch(x: np.ndarray, layout: Layout) -> np.ndarray:
    """klingjax array -> torch-layout array (C-contiguous)."""
    if layout in _TO_TORCH_AXES:
        x = np.transpose(x, _TO_TORCH_AXES[layout])
    elif layout in _GAMMA_ONES:
        x = x.reshape(torch_shape(x.shape, layout))
    return np.ascontiguousarray(x)


def from_torch(w: np.ndarray, layout: Layout) -> np.ndarray:
    """torch-layout array -> klingjax array (inverse of `to_torch`)."""
    if layout in _TO_TORCH_AXES:
        w = np.transpose(w, np.argsort(_TO_TORCH_AXES[layout]))
    elif layout in _GAMMA_ONES:
        w = w.reshape(w.shape[0])
    return np.ascontiguousarray(w)


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (full match on the dotted klingjax path) -> `target` (diffusers name) with `layout`.

    `stacked=True` marks parameters stored with a leading "layers" axis: one torch tensor per layer,
    named by `target` with `{layer}` filled in.
    """

    pattern: str
    target: str
    layout: Layout = Layout.SAME
    stacked: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: where it lives in the klingjax state and how it is laid out."""

    path: tuple[str, ...]  # klingjax parameter path inside the model state (no trailing "value")
    layer: int | None  # index on the leading "layers" axis, or None
    name: str  # diffusers state-dict key
    layout: Layout
    shape: tuple[int, ...]  # klingjax shape of this tensor (without the layers axis)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return torch_shape(self.shape, self.layout)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def param_shapes(model: nnx.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every `nnx.Param` of a (usually abstract, `nnx.eval_shape`d) model."""
    state = nnx.state(model, nnx.Param)
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def expand(rules: Iterable[Rule], shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[Entry]:
    """Apply `rules` (first match wins) to every parameter; raises if one matches no rule or names collide."""
    rules = list(rules)
    compiled = [(re.compile(r.pattern), r) for r in rules]
    entries: list[Entry] = []
    for path, shape in shapes.items():
        dotted = ".".join(path)
        for regex, rule in compiled:
            m = regex.fullmatch(dotted)
            if m is None:
                continue
            name = m.expand(rule.target)
            if rule.stacked:
                if "{layer}" not in name or not shape:
                    raise ValueError(f"stacked rule {rule.pattern!r} needs a '{{layer}}' target and a layers axis")
                entries += [Entry(path, i, name.format(layer=i), rule.layout, shape[1:]) for i in range(shape[0])]
            else:
                entries.append(Entry(path, None, name, rule.layout, shape))
            torch_shape(entries[-1].shape, rule.layout)  # raises on a rank the layout cannot take
            break
        else:
            raise ValueError(f"no export rule matches parameter {dotted!r}")
    check_unique(entries)
    return entries


def check_unique(entries: Sequence[Entry]) -> None:
    """Raise unless every (path, layer) and every diffusers name occurs exactly once."""
    seen_names: dict[str, Entry] = {}
    seen_paths: set[tuple] = set()
    for e in entries:
        if e.name in seen_names:
            raise ValueError(f"diffusers name {e.name!r} is produced twice: {seen_names[e.name].path} and {e.path}")
        if (e.path, e.layer) in seen_paths:
            raise ValueError(f"parameter {'.'.join(e.path)} (layer {e.layer}) is mapped twice")
        seen_names[e.name] = e
        seen_paths.add((e.path, e.layer))
