"""Deterministic captioned moving-sprite clips with ground-truth metadata (the embedded demo dataset).

Every clip is a function of `(spec, seed, index[, split])`: a textured solid background, one or two
anti-aliased sprites (circle / square / triangle) moving in a straight line at constant speed, and
optionally a constant camera pan. Under a pan the background texture and every object shift together;
an object's `direction` is its motion relative to the scene. Pan speed is kept below 0.4x the slowest
object speed, so the sign of an object's on-screen motion along its axis always matches its direction.

The held-out split is a fixed subset of (colour, shape, direction, background) combinations chosen by
a stable hash, independent of the seed: eval clips only use held-out combos, train clips never do.

Modules: `spec` (SyntheticSpec, Clip, vocabularies), `combos` (held-out split), `sprites` (SDF
rasterisation), `background` (texture), `captions` (caption text), `clips` (generate_clip / generate_split).
"""

from klingjax.data.synthetic.clips import generate_clip, generate_split
from klingjax.data.synthetic.combos import heldout_combos, split_combos
from klingjax.data.synthetic.spec import (
    DEFAULT_BACKGROUNDS,
    DEFAULT_COLOURS,
    DIRECTION_VECTORS,
    SPLITS,
    Clip,
    Combo,
    SyntheticSpec,
)
from klingjax.data.synthetic.sprites import rasterize, sprite_height

__all__ = [
    "DEFAULT_BACKGROUNDS",
    "DEFAULT_COLOURS",
    "DIRECTION_VECTORS",
    "SPLITS",
    "Clip",
    "Combo",
    "SyntheticSpec",
    "generate_clip",
    "generate_split",
    "heldout_combos",
    "rasterize",
    "split_combos",
    "sprite_height",
]
