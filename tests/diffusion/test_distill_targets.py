"""The distillation targets (klingjax/diffusion/distill.py) on flows whose answers are known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klingjax.diffusion import distill
from klingjax.diffusion.schedules import sampling_timesteps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_trajectory_times_are_the_nested_teacher_grid_of_one_student_step(shift):
    i, times = distill.trajectory_times(jax.random.key(0), 64, 4, 24, shift)
    student, teacher = np.asarray(sampling_timesteps(4, shift)), np.asarray(sampling_timesteps(24, shift))
    assert times.shape == (64, 7) and set(np.asarray(i)) == {0, 1, 2, 3}
    for row, step in zip(np.asarray(times), np.asarray(i)):
        np.testing.assert_allclose(row[[0, -1]], student[[step, step + 1]], rtol=1e-6)
        np.testing.assert_allclose(row, teacher[6 * step:6 * step + 7], rtol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        distill.trajectory_times(jax.random.key(0), 4, 4, 10, shift)


def test_trajectory_target_of_straight_paths_is_their_velocity_and_of_curved_paths_the_chord():
    x0 = jnp.asarray([[1.0, -2.0], [0.5, 3.0]])
    noise = jnp.asarray([[0.3, 0.7], [-1.0, 0.2]])
    times = jnp.asarray([[0.9, 0.7, 0.5], [0.5, 0.25, 0.0]])
    x_t = (1 - times[:, :1]) * x0 + times[:, :1] * noise
    straight = lambda x, t: (x - x0) / t[:, None]  # the flow of one data point: every Euler step is exact
    np.testing.assert_allclose(distill.trajectory_target(straight, x_t, times), noise - x0, rtol=1e-5)
    # v = x: the teacher's Euler jump is x (1 + dt1)(1 + dt2); the target is that chord's slope, not v itself.
    target = distill.trajectory_target(lambda x, t: x, x_t, times)
    dt = jnp.diff(times, axis=1)
    want = (x_t * ((1 + dt[:, :1]) * (1 + dt[:, 1:]) - 1)) / (times[:, -1:] - times[:, :1])
    np.testing.assert_allclose(target, want, rtol=1e-5)


def _gaussian_flow(s):
    """Data ~ N(0, s^2) per element: sigma_t = sqrt((1-t)^2 s^2 + t^2) and the exact flow maps z_r = z_t sigma_r /
    sigma_t, so u(z, t, h) = z (1 - sigma_{t-h} / sigma_t) / h and v(z, t) = z sigma_t' / sigma_t."""
    sigma = lambda t: jnp.sqrt((1 - t) ** 2 * s**2 + t**2)
    ex = lambda t, z: t.reshape(t.shape + (1,) * (z.ndim - 1))
    u = lambda z, t, h: z * ex((1 - sigma(t - h) / sigma(t)) / h, z)
    v = lambda z, t: z * ex((t - (1 - t) * s**2) / sigma(t) ** 2, z)
    return u, v


def test_mean_flow_target_holds_for_the_exact_average_velocity_and_not_for_a_wrong_one():
    u, v = _gaussian_flow(0.5)
    z = jax.random.normal(jax.random.key(0), (3, 4, 2))
    t, r = jnp.asarray([0.9, 0.6, 0.4]), jnp.asarray([0.5, 0.1, 0.0])
    pred, target = distill.mean_flow_target(u, z, t, r, v(z, t))
    np.testing.assert_allclose(pred, u(z, t, t - r), rtol=1e-6)
    np.testing.assert_allclose(target, pred, rtol=1e-4, atol=1e-6)  # the MeanFlow identity, through jax.jvp
    # A model that predicts the instantaneous velocity for every jump is not a fixed point (its target differs).
    wrong = lambda z, t, h: v(z, t)
    pred_w, target_w = distill.mean_flow_target(wrong, z, t, r, v(z, t))
    assert float(jnp.max(jnp.abs(target_w - pred_w))) > 0.05


def test_mean_flow_times_mix_instantaneous_draws_with_grid_jumps():
    shift = 3.0
    t, r = distill.mean_flow_times(jax.random.key(0), 4096, (1, 2, 4), shift, instant_fraction=0.25)
    t, r = np.asarray(t), np.asarray(r)
    assert np.all(t >= r) and np.all((0 <= r) & (t <= 1))
    instant = t == r
    assert 0.2 < instant.mean() < 0.3
    jumps = np.stack([t[~instant], r[~instant]], -1)  # (M, 2)
    want = np.concatenate([np.stack([g[:-1], g[1:]], -1) for g in
                           (np.asarray(sampling_timesteps(n, shift)) for n in (1, 2, 4))])  # (7, 2)
    dist = np.abs(jumps[:, None] - want[None]).max(-1)  # (M, 7)
    assert dist.min(1).max() < 1e-5  # every jump is a step of the 1-, 2- or 4-step grid
    assert np.all(dist.min(0) < 1e-5)  # and every such step is drawn


def test_shortcut_times_put_the_finer_grid_point_between_each_coarse_jump():
    shift = 3.0
    t, m, r = (np.asarray(a) for a in distill.shortcut_times(jax.random.key(1), 512, (1, 2, 4), shift))
    assert np.all((t > m) & (m > r))
    fine = {n: np.asarray(sampling_timesteps(2 * n, shift)) for n in (1, 2, 4)}
    for a, b, c in zip(t, m, r):  # (t, m, r) = fine[2i], fine[2i + 1], fine[2i + 2] of one level's 2n-step grid
        assert any(np.allclose([a, b, c], g[j:j + 3], atol=1e-6)
                   for g in fine.values() for j in range(0, len(g) - 2, 2))


def test_shortcut_target_of_the_exact_flow_map_is_the_exact_average_velocity():
    u, _ = _gaussian_flow(0.5)
    z = jax.random.normal(jax.random.key(0), (3, 4, 2))
    t, m, r = jnp.asarray([0.9, 0.6, 0.5]), jnp.asarray([0.7, 0.3, 0.2]), jnp.asarray([0.5, 0.1, 0.0])
    np.testing.assert_allclose(distill.shortcut_target(u, z, t, m, r), u(z, t, t - r), rtol=1e-5, atol=1e-6)
    # Two Euler half-steps of the instantaneous velocity are not the average velocity: the target says so.
    _, v = _gaussian_flow(0.5)
    euler = distill.shortcut_target(lambda z, t, h: v(z, t), z, t, m, r)
    assert float(jnp.max(jnp.abs(euler - u(z, t, t - r)))) > 0.01
