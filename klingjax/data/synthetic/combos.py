"""The held-out split: a fixed, seed-independent subset of (colour, shape, direction, background) combos."""

from __future__ import annotations

import functools
import hashlib
import itertools

import numpy as np

from klingjax.data.synthetic.spec import SPLITS, Combo, SyntheticSpec


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=32)
def heldout_combos(spec: SyntheticSpec) -> frozenset[Combo]:
    """The held-out (colour, shape, direction, background) combos: ~heldout_fraction of all, by stable hash."""
    colours = [c for c, _ in spec.colours]
    backgrounds = [b for b, _ in spec.backgrounds]
    combos = list(itertools.product(colours, spec.shapes, spec.directions, backgrounds))
    target = round(spec.heldout_fraction * len(combos))
    held: set[Combo] = set()
    # Count how often each attribute value appears in the remaining (train) combos, so that
    # holding a combo out never removes a colour / shape / direction / background from training.
    remaining = [dict.fromkeys(vals, 0) for vals in (colours, spec.shapes, spec.directions, backgrounds)]
    for combo in combos:
        for i, v in enumerate(combo):
            remaining[i][v] += 1
    for combo in sorted(combos, key=lambda c: _stable_hash("|".join(c))):
        if len(held) >= target:
            break
        if all(remaining[i][v] > 1 for i, v in enumerate(combo)):
            held.add(combo)
            for i, v in enumerate(combo):
                remaining[i][v] -= 1
    return frozenset(held)


@functools.lru_cache(maxsize=32)
def split_combos(spec: SyntheticSpec, split: str) -> tuple[Combo, ...]:
    """All combos allowed in `split` ("train" or "eval"), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    held = heldout_combos(spec)
    colours = [c for c, _ in spec.colours]
    backgrounds = [b for b, _ in spec.backgrounds]
    combos = itertools.product(colours, spec.shapes, spec.directions, backgrounds)
    return tuple(c for c in combos if (c in held) == (split == "eval"))


def sample_combos(spec: SyntheticSpec, rng: np.random.Generator, split: str | None) -> list[Combo]:
    """One combo of `split` (None: any), and with probability p_two_objects a second of another colour on the same
    background (so the two stay separable)."""
    combos = split_combos(spec, split) if split else split_combos(spec, "train") + split_combos(spec, "eval")
    if not combos:
        raise ValueError(f"split {split!r} has no combos (heldout_fraction={spec.heldout_fraction})")
    first = combos[rng.integers(len(combos))]
    if rng.random() >= spec.p_two_objects:
        return [first]
    # The second object shares the background and never the colour (so the two stay separable).
    others = [c for c in combos if c[3] == first[3] and c[0] != first[0]]
    return [first, others[rng.integers(len(others))]] if others else [first]
