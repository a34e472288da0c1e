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


def _sample_error(sampler, steps, n=4096, shift=1.0):
    noise = jax.random.normal(jax.random.key(3), (n, 2))
    vel = lambda x, t, t_next=None: exact_velocity(x, t)  # FLOW_MAP on the instantaneous velocity: Euler
    out = samplers.sample(vel, noise, num_steps=steps, sampler=sampler, shift=shift)
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


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_beats_euler_and_converges(shift):
    """UniPC (N evaluations) vs Euler (N) at 10 steps, convergence 5 -> 20 steps, and the corrector's gain over
    DPM-Solver++(2M), whose update is UniPC's predictor, at 40 steps. Measured: shift 1 UniPC/Euler 0.002/0.056,
    shift 3 0.073/0.106 (the shifted grid puts fewer steps near t = 0, where this field bends most)."""
    err = lambda sampler, steps: _sample_error(sampler, steps, shift=shift)[0]  # noqa: E731
    euler, unipc = err(samplers.Sampler.EULER, 10), err(samplers.Sampler.UNIPC, 10)
    bound = 0.5 if shift == 1.0 else 0.8
    assert unipc < bound * euler, f"shift {shift}: UniPC / Euler error at 10 steps = {unipc:.4g} / {euler:.4g}"
    e5, e20 = err(samplers.Sampler.UNIPC, 5), err(samplers.Sampler.UNIPC, 20)
    assert e20 < e5 / 4, f"shift {shift}: UniPC error at 5 / 20 steps = {e5:.4g} / {e20:.4g}"
    dpm, unipc = err(samplers.Sampler.DPM_SOLVER_PP_2M, 40), err(samplers.Sampler.UNIPC, 40)
    assert unipc < 0.75 * dpm, f"shift {shift}: UniPC / DPM++(2M) error at 40 steps = {unipc:.4g} / {dpm:.4g}"


def _recording(fn, log):
    """fn with the t (and t_next, if given) of every evaluation appended to `log` from inside the traced loop."""

    def wrapped(x, t, *args, **kwargs):
        jax.debug.callback(lambda *ts: log.append(tuple(float(u) for u in ts)), t, *kwargs.values())
        return fn(x, t, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_unipc_evaluates_once_per_step_at_the_grid_times(steps):
    """num_steps evaluations at t_0 = 1 - 1e-4 (the t = 1 guard), t_1, ..., t_{N-1}; none at t = 0. One step returns
    the data prediction x - t v at the noise; two return it at the first-order (DDIM) step to t_1."""
    noise = jax.random.normal(jax.random.key(5), (64, 2))
    log = []
    out = samplers.sample(_recording(exact_velocity, log), noise, num_steps=steps, sampler=samplers.Sampler.UNIPC,
                          shift=3.0)
    jax.effects_barrier()
    grid = np.minimum(np.asarray(schedules.sampling_timesteps(steps, 3.0)), 1 - 1e-4)
    np.testing.assert_allclose([t for (t,) in log], grid[:-1], rtol=1e-6)
    t0, t1 = grid[0], grid[1]
    x = noise
    if steps == 2:
        lam = lambda t: np.log((1 - t) / t)  # noqa: E731
        x = t1 / t0 * x - (1 - t1) * np.expm1(lam(t0) - lam(t1)) * (x - t0 * exact_velocity(x, t0))
        t0 = t1
    if steps <= 2:
        np.testing.assert_allclose(out, x - t0 * exact_velocity(x, t0), rtol=1e-5, atol=1e-5)


def test_flow_map_one_step_is_exact_for_the_exact_average_velocity():
    """The flow of one point x0 is a line: its average velocity over any jump is e - x0 = (x - x0) / t."""
    x0 = jax.random.normal(jax.random.key(6), (8, 3))
    noise = jax.random.normal(jax.random.key(7), (8, 3))
    average = lambda x, t, *, t_next: (x - x0) / t  # noqa: E731
    for steps in (1, 3):
        out = samplers.sample(average, noise, num_steps=steps, sampler=samplers.Sampler.FLOW_MAP, shift=3.0)
        np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_flow_map_tells_the_model_where_each_jump_ends():
    """An average velocity (x - y(t_next)) / (t - t_next) lands each jump on y(t_next): only the right t_next gives
    y(0) (a wrong one divides by 0 or misses), and the evaluations are at (t_i, t_{i+1}) of the grid."""
    x0, c = jnp.full((4, 2), 0.7), jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    y = lambda s: x0 + s**2 * c + jnp.sin(3.0 * s)  # noqa: E731  a curve with y(0) = x0
    average = lambda x, t, *, t_next: (x - y(t_next)) / (t - t_next)  # noqa: E731
    log = []
    noise = jax.random.normal(jax.random.key(8), (4, 2))
    out = samplers.sample(_recording(average, log), noise, num_steps=4, sampler=samplers.Sampler.FLOW_MAP, shift=3.0)
    jax.effects_barrier()
    grid = np.asarray(schedules.sampling_timesteps(4, 3.0))
    np.testing.assert_allclose(np.array(log), np.stack([grid[:-1], grid[1:]], axis=1), rtol=1e-6)
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


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
