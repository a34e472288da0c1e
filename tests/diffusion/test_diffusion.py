"""Schedules, loss, samplers and guidance, checked on Gaussian data where the exact velocity field is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klingjax.diffusion import guidance, losses, samplers, schedules

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


class _Model:
    """A batched model_fn(x, t, cond) mixing two known velocity fields by cond["w"] (B,); records batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        assert cond["none"] is None and t.shape == x.shape[:1]
        w = cond["w"][:, None]
        return w * jnp.sin(x) + (1 - w) ** 2 * exact_velocity(x, t[:, None]) + w * t[:, None]


def _cond(w, b=3):
    return {"w": jnp.full((b,), w), "none": None}


def test_guidance_is_cfg_in_one_batched_call_and_scale_one_is_one_call():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    t = jnp.array([0.2, 0.5, 0.9])
    model = _Model()
    v_c, v_u = model(x, t, _cond(1.0)), model(x, t, _cond(0.0))  # the two fields, one call each
    for s in (0.0, 3.5, 7.0):
        model.batches = []
        got = guidance.guided_velocity(model, x, t, _cond(1.0), _cond(0.0), s)
        np.testing.assert_allclose(got, v_u + s * (v_c - v_u), rtol=1e-6, atol=1e-6)
        assert model.batches == [6]  # cond and uncond stacked into one call
    model.batches = []
    np.testing.assert_array_equal(guidance.guided_velocity(model, x, t, _cond(1.0), _cond(0.0), 1.0), v_c)
    assert model.batches == [3]  # scale 1: the conditional branch alone


def test_chained_guidance_separate_scales():
    """Open-Sora-style image + text guidance: v = v_0 + s_img (v_img - v_0) + s_txt (v_full - v_img)."""
    x = jax.random.normal(jax.random.key(1), (3, 4))
    t = jnp.array([0.3, 0.6, 0.1])
    model = _Model()
    v_full, v_img, v_0 = (model(x, t, _cond(w)) for w in (1.0, 0.5, 0.0))
    model.batches = []
    got = guidance.chained_guidance(model, x, t, _cond(1.0), [(_cond(0.5), 4.0), (_cond(0.0), 2.0)])
    np.testing.assert_allclose(got, v_0 + 2.0 * (v_img - v_0) + 4.0 * (v_full - v_img), rtol=1e-5, atol=1e-5)
    assert model.batches == [9]
    model.batches = []  # a trailing scale of 1 cancels: its branch is not evaluated
    got = guidance.chained_guidance(model, x, t, _cond(1.0), [(_cond(0.5), 4.0), (_cond(0.0), 1.0)])
    np.testing.assert_allclose(got, v_img + 4.0 * (v_full - v_img), rtol=1e-6, atol=1e-6)
    assert model.batches == [6]
    with pytest.raises(ValueError, match="different structure"):
        guidance.guided_velocity(model, x, t, _cond(1.0), {"w": jnp.zeros(3), "none": jnp.zeros(3)}, 5.0)


def test_guidance_inside_a_jitted_sampler():
    """The helper traces inside the sampler's loop (scalar t -> a (B,) vector, as the DiT callers do)."""
    model = lambda x, t, c: exact_velocity(x, t[:, None]) * c["w"][:, None]
    noise = jax.random.normal(jax.random.key(2), (8, 2))

    @jax.jit
    def run(noise):
        vel = lambda x, t: guidance.guided_velocity(model, x, jnp.full((8,), t), {"w": jnp.ones(8)},
                                                     {"w": jnp.zeros(8)}, 1.5)
        return samplers.sample(vel, noise, num_steps=20)

    want = samplers.sample(lambda x, t: 1.5 * exact_velocity(x, t), noise, num_steps=20)
    np.testing.assert_allclose(run(noise), want, rtol=1e-5, atol=1e-5)


def test_sampling_grid_validation():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.sampling_timesteps(0)
