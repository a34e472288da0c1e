"""Caption text for a clip: its objects' (colour, shape, direction), background and camera motion."""

from __future__ import annotations

import numpy as np

from klingjax.data.synthetic.spec import Combo

SINGLE_TEMPLATES = (
    "a {colour} {shape} moves {direction} on a {background} background",
    "a {colour} {shape} moving {direction} on a {background} background",
    "a {colour} {shape} slides {direction} across a {background} background",
)


def caption(rng: np.random.Generator, combos: list[Combo], camera: str, camera_words: list[str] = ()) -> str:
    """Caption of a clip with objects `combos` (one template drawn from `rng` if single) and `camera` motion (a pan
    name or "static"); `camera_words`: phrases of camera moves appended ("the camera zooms in")."""
    background = combos[0][3]
    if len(combos) == 1:
        c, s, d, b = combos[0]
        text = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))].format(
            colour=c, shape=s, direction=d, background=b)
    else:
        parts = [f"a {c} {s} moves {d}" for c, s, d, _ in combos]
        text = " and ".join(parts) + f" on a {background} background"
    if camera != "static":
        text += f", the camera pans {camera.removeprefix('pan_')}"
    if camera_words:
        text += ", " + " and ".join(camera_words)
    return text
