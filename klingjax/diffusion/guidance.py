"""Classifier-free guidance for every sampling caller, with all guided branches in ONE batched model call.

`model_fn(x, t, cond) -> v` is a batched velocity model: x (B, ...), t (B,), cond any pytree of (B, ...) arrays
(the DiT's `Conditions`; this module imports no model). The branches are stacked along the batch (x, t and the
condition pytrees concatenated leaf by leaf), evaluated once, and split again. Scales are usually Python floats;
arrays work too, but only a Python 1 lets a branch be skipped.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, Any], Any]  # (x (B, ...), t (B,), cond pytree) -> v (B, ...)


def guided_velocity(model_fn: ModelFn, x: jax.Array, t: jax.Array, cond: Any, uncond: Any, scale) -> Any:
    """CFG: v_u + scale (v_c - v_u), cond and uncond (the empty or negative prompt) batched; scale 1: v_c, one call."""
    return chained_guidance(model_fn, x, t, cond, [(uncond, scale)])


def chained_guidance(model_fn: ModelFn, x: jax.Array, t: jax.Array, cond: Any,
                     terms: Sequence[tuple[Any, Any]]) -> Any:
    """Guidance by several conditions, each with its own scale, in one batched call.

    terms ((c_1, s_1), ..., (c_n, s_n)) drop conditions step by step from the full `cond` = c_0 (c_n is usually
    the empty condition), and
        v = v_n + sum_i s_i (v_{i-1} - v_i),
    so s_i scales what the conditions dropped at step i add. One term is CFG. Two are the image + text guidance of
    InstructPix2Pix / Open-Sora 2.0: cond = text + image, terms = ((image only, s_text), (neither, s_image)).
    Trailing terms of scale 1 cancel (v_n + (v_{n-1} - v_n) = v_{n-1}), so their branches are not evaluated.
    Every condition must have `cond`'s pytree structure (for `Conditions`: the same fields present).
    """
    terms = list(terms)
    while terms and isinstance(terms[-1][1], numbers.Real) and terms[-1][1] == 1:
        terms.pop()
    if not terms:
        return model_fn(x, t, cond)
    conds = [cond] + [c for c, _ in terms]
    for i, c in enumerate(conds[1:], 1):
        if jax.tree.structure(c) != jax.tree.structure(cond):
            raise ValueError(f"guidance condition {i} has a different structure than the full condition (a field "
                             f"present in one is None in the other): {jax.tree.structure(c)} vs "
                             f"{jax.tree.structure(cond)}")
    m, b = len(conds), x.shape[0]
    both = jax.tree.map(lambda *a: jnp.concatenate(a), *conds)  # leaves (m*B, ...): c_0, c_1, ..., c_n
    v = model_fn(jnp.concatenate([x] * m), jnp.concatenate([t] * m), both)  # (m*B, ...)
    vs = [jax.tree.map(lambda a, i=i: a[i * b:(i + 1) * b], v) for i in range(m)]  # v_0 ... v_n, each (B, ...)
    out = vs[-1]
    for i in range(len(terms), 0, -1):
        scale = terms[i - 1][1]
        out = jax.tree.map(lambda o, hi, lo, s=scale: o + s * (hi - lo), out, vs[i - 1], vs[i])
    return out
