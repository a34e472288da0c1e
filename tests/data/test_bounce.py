"""Bouncing sprites (klingjax/data/synthetic/bounce.py): the closed-form ground truth is exact -- positions stay on
their track, every bounce is listed at the time the sprite touches an edge, directions flip exactly there -- and long
clips render window by window identically to one piece."""

from __future__ import annotations

import numpy as np
import pytest

from klingjax.data.synthetic import SyntheticSpec, generate_clip
from klingjax.data.synthetic.bounce import bounces, long_clip, reflect

SPEC = SyntheticSpec(num_frames=17, motion="bounce", size_range=(9.0, 13.0), speed_range=(1.2, 2.0))


@pytest.mark.parametrize("start, velocity", [(2.0, 1.5), (19.5, -0.7), (1.0, 3.3), (20.0, 2.0)])
def test_reflect_is_a_triangle_wave_and_bounces_are_exact(start, velocity):
    lo, hi = 1.0, 20.0
    t = np.linspace(0, 200, 4001)
    pos, vel = reflect(start, velocity, lo, hi, t)
    assert pos.min() >= lo - 1e-9 and pos.max() <= hi + 1e-9
    # Numerical derivative equals the returned velocity away from the bounces.
    found = bounces(start, velocity, lo, hi, 200.0)
    away = np.all([np.abs(t - tb) > 0.1 for tb, _ in found], axis=0) if found else np.ones_like(t, bool)
    np.testing.assert_allclose(np.gradient(pos, t)[away][1:-1], vel[away][1:-1], atol=1e-6)
    for tb, edge in found:  # at each bounce the point is on that edge and its velocity flips across it
        p, _ = reflect(start, velocity, lo, hi, np.array([tb]))
        assert p[0] == pytest.approx(lo if edge == "lo" else hi, abs=1e-9)
        _, (v0, v1) = reflect(start, velocity, lo, hi, np.array([tb - 1e-6, tb + 1e-6]))
        assert np.sign(v0) == -np.sign(v1) and (v1 > 0) == (edge == "lo")
    expected = abs(velocity) * 200 / (hi - lo)  # crossings of the unfolded coordinate, +-1
    assert abs(len(found) - expected) <= 1


def test_long_clip_windows_equal_one_render_and_the_sprite_never_leaves():
    clip = long_clip(SPEC, 0, 3, 240)
    whole = clip.frames(0, 240)
    np.testing.assert_array_equal(np.concatenate([f for _, f in clip.windows(17)]), whole)
    s = clip.sprites[0]
    assert "bounces" in clip.caption and {"left and right", "up and down"} & {clip.caption.split("bounces ")[1][:14],
                                                                            clip.caption.split("bounces ")[1][:11]}
    meta = clip.meta["objects"][0]
    assert len(meta["bounces"]) >= 10  # 1.2-2 px / frame over < 23 px of track: a bounce every ~15 frames
    # Every frame shows the whole sprite: foreground mass is constant (no clipping at the border).
    fg = np.abs(whole.astype(int) - clip.background_frame().astype(int)).sum(-1) > 30
    area = fg.sum((1, 2))
    assert area.min() > 0.85 * area.max()
    # The rendered centroid follows the closed-form one.
    ys, xs = np.mgrid[:32, :32] + 0.5
    centre = np.stack([(fg * ys).sum((1, 2)) / area, (fg * xs).sum((1, 2)) / area], -1)
    np.testing.assert_allclose(centre, s.centroid(np.arange(240.0)), atol=0.75)
    assert set(s.directions(np.arange(240.0))) == ({"left", "right"} if s.axis else {"up", "down"})


def test_training_windows_bounce_and_name_the_net_direction():
    clips = [generate_clip(SPEC, 0, i, "train") for i in range(24)]
    assert any(c.meta["objects"][0]["bounces"] for c in clips)
    for c in clips:
        obj = c.meta["objects"][0]
        net = np.asarray(obj["screen_velocity"])
        axis = 0 if obj["direction"] in ("up", "down") else 1
        assert (net[axis] > 0) == (obj["direction"] in ("down", "right")), obj
        assert c.frames.shape == (17, 32, 32, 3) and "bounc" in c.caption


def test_straight_motion_is_unchanged_and_unknown_motion_is_named():
    plain = SyntheticSpec(num_frames=9)
    assert all("bounc" not in generate_clip(plain, 0, i).caption for i in range(8))
    with pytest.raises(ValueError, match="motion must be one of"):
        SyntheticSpec(motion="wrap")
