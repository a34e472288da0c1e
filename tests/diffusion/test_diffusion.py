"""Schedules, loss and samplers, checked on Gaussian data where the exact velocity field is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klingjax.diffusion import losses, samplers, schedules

MU, S = 1.5, 0.5  # data x0 ~ N(MU, S^2) per coordinate


def exact_velocity(x, t):
    """E[e - x0 | x_t] for x0 ~ N(MU, S^2), e ~ N(0, 1), x_t = (1-t) x0 + t e."""
    m = (1 - t) * MU
    var = (1 - t) ** 2 * S**2 + t**2
    e_hat = t / var * (x - m)
    x0_hat = MU + (1 - t) * S**2 / var * (x - m)
    return e_hat - x0_hat


def test_time_shift_monotone_and_endpoints():
    t = jnp.linspace(0, 1, 11)
    for s in (0.5, 1.0, 3.0):
        w = schedules.time_shift(t, s)
        assert float(w[0]) == 0.0 and abs(float(w[-1]) - 1.0) < 1e-6
        assert bool(jnp.all(jnp.diff(w) > 0))
    assert float(schedules.time_shift(jnp.array(0.5), 3.0)) > 0.5


def test_resolution_shift_grows_with_tokens():
    assert schedules.resolution_shift(256) == pytest.approx(np.exp(0.5))
    assert schedules.resolution_shift(4096) == pytest.approx(np.exp(1.15))
    assert schedules.resolution_shift(75_600) > schedules.resolution_shift(4096)


@pytest.mark.parametrize("method", list(schedules.TimestepSampling))
def test_sample_timesteps_range_and_determinism(method):
    key = jax.random.key(0)
    t = schedules.sample_timesteps(key, 4096, method=method)
    assert t.shape == (4096,) and float(t.min()) > 0 and float(t.max()) < 1
    np.testing.assert_array_equal(t, schedules.sample_timesteps(key, 4096, method=method))
    assert abs(float(t.mean()) - 0.5) < 0.03


def test_logit_normal_concentrates_mid_range():
    t = schedules.sample_timesteps(jax.random.key(1), 20000, method=schedules.TimestepSampling.LOGIT_NORMAL)
    mid = float(jnp.mean((t > 0.25) & (t < 0.75)))
    assert mid > 0.6  # uniform would give 0.5


def test_loss_is_zero_for_exact_velocity_on_deterministic_data():
    x0 = jnp.full((4, 3, 2), MU)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    t = jnp.array([0.1, 0.4, 0.7, 0.9])
    true_v = lambda x_t, t: noise - x0
    loss, per = losses.flow_matching_loss(true_v, x0, noise, t)
    assert float(loss) == 0.0 and per.shape == (4,)
    loss_bad, _ = losses.flow_matching_loss(lambda x, t: jnp.zeros_like(x), x0, noise, t)
    assert float(loss_bad) > 0.5


def test_cosmap_weight_is_symmetric_and_peaks_mid():
    t = jnp.array([0.1, 0.5, 0.9])
    w = losses.loss_weight(t, losses.LossWeighting.COSMAP)
    assert float(w[1]) > float(w[0]) and float(w[0]) == pytest.approx(float(w[2]))


def _sample_error(sampler, steps, n=4096):
    noise = jax.random.normal(jax.random.key(3), (n, 2))
    vel = lambda x, t: exact_velocity(x, t)
    out = samplers.sample(vel, noise, num_steps=steps, sampler=sampler)
    exact = MU + S * noise  # the flow map of a Gaussian is affine
    return float(jnp.mean(jnp.abs(out - exact))), out


@pytest.mark.parametrize("sampler", list(samplers.Sampler))
def test_samplers_converge_to_data_distribution(sampler):
    err, out = _sample_error(sampler, 50)
    assert err < 0.02
    assert abs(float(out.mean()) - MU) < 0.05 and abs(float(out.std()) - S) < 0.03


@pytest.mark.parametrize("sampler", list(samplers.Sampler))
def test_more_steps_lower_error(sampler):
    errs = [_sample_error(sampler, n)[0] for n in (4, 10, 40)]
    assert errs[0] > errs[1] > errs[2]


def test_higher_order_beats_euler_at_10_steps():
    euler = _sample_error(samplers.Sampler.EULER, 10)[0]
    assert _sample_error(samplers.Sampler.HEUN, 10)[0] < euler / 2
    assert _sample_error(samplers.Sampler.DPM_SOLVER_PP_2M, 10)[0] < euler / 2


def test_cfg_scale_one_is_conditional_and_extrapolates_otherwise():
    cond = lambda x, t: jnp.ones_like(x)
    uncond = lambda x, t: jnp.zeros_like(x)
    x = jnp.zeros((2, 2))
    np.testing.assert_allclose(samplers.guided(cond, uncond, 1.0)(x, 0.5), 1.0)
    np.testing.assert_allclose(samplers.guided(cond, uncond, 5.0)(x, 0.5), 5.0)


def test_sampling_grid_validation():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.sampling_timesteps(0)
