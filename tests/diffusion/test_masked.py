"""Masked flow matching: given latents are overwritten exactly, excluded from the loss and held through sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_diffusion import MU, exact_velocity

from klingjax.diffusion import losses, masked, samplers

SHAPE = (2, 3, 4, 4, 2)  # latents (B, t, h, w, C)


def _data(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.normal(k[0], SHAPE)
    noise = jax.random.normal(k[1], SHAPE)
    mask = jnp.zeros(SHAPE[:4], bool).at[:, 0].set(True).at[1, 2, 1:3, 1:3].set(True)  # frame 0 + a box (B 1)
    return x0, noise, mask, jnp.array([0.3, 0.8])


def test_apply_given_overwrites_exactly_the_given_positions():
    x0, noise, mask, _ = _data()
    out = np.asarray(masked.apply_given(noise, x0, mask))
    m = np.asarray(mask)[..., None]
    np.testing.assert_array_equal(out, np.where(m, x0, noise))
    float_mask = mask.astype(jnp.float32) * 0.6  # float masks: >= 0.5 is given
    np.testing.assert_array_equal(masked.apply_given(noise, x0, float_mask), out)
    with pytest.raises(ValueError, match="does not match latents"):
        masked.apply_given(noise, x0, mask[:, :2])


def test_loss_with_nothing_given_is_the_plain_loss_bitwise():
    x0, noise, _, t = _data()
    model = lambda x_t, t: jnp.sin(3 * x_t) * t[:, None, None, None, None]  # noqa: E731
    want = losses.flow_matching_loss(model, x0, noise, t, weighting=losses.LossWeighting.COSMAP)
    nothing = jnp.zeros(SHAPE[:4], bool)
    for got in (masked.masked_flow_loss(model, x0, noise, t, nothing, weighting=losses.LossWeighting.COSMAP),
                masked.masked_flow_loss(model, x0, noise, t, None, weighting=losses.LossWeighting.COSMAP),
                losses.flow_matching_loss(model, x0, noise, t, weighting=losses.LossWeighting.COSMAP,
                                          loss_mask=jnp.ones(SHAPE[:4], bool))):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_loss_excludes_given_positions_and_feeds_them_clean():
    x0, noise, mask, t = _data()
    pred = jax.random.normal(jax.random.key(7), SHAPE)
    seen = []

    def model(v, x_t, t):
        seen.append(x_t)
        return v + 0.0 * x_t

    loss_fn = lambda v: masked.masked_flow_loss(lambda x_t, t: model(v, x_t, t), x0, noise, t, mask)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(loss_fn)(pred)
    m = np.asarray(mask)[..., None] & np.ones(SHAPE, bool)
    assert not np.asarray(grad)[m].any() and np.abs(np.asarray(grad)[~m]).min() > 0
    se = np.square(np.asarray(pred) - np.asarray(noise - x0))
    per = [se[b][~m[b]].mean() for b in range(2)]
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-6)
    x_t = np.asarray(seen[-1])  # the model input: x0 at given positions, (1 - t) x0 + t e elsewhere
    np.testing.assert_array_equal(x_t[m], np.asarray(x0)[m])
    tt = np.asarray(t)[:, None, None, None, None]
    np.testing.assert_allclose(x_t[~m], ((1 - tt) * x0 + tt * noise)[~m], rtol=1e-6)
    all_given = jnp.ones(SHAPE[:4], bool)  # nothing to learn: loss 0, not NaN
    loss, per = masked.masked_flow_loss(lambda x_t, t: pred, x0, noise, t, all_given)
    assert float(loss) == 0.0 and per.shape == (2,)
    with pytest.raises(ValueError, match="loss_mask of shape"):
        losses.flow_matching_loss(lambda x_t, t: pred, x0, noise, t, loss_mask=mask[:, :2])


@pytest.mark.parametrize("sampler", list(samplers.Sampler))
def test_sampler_keeps_given_positions_exact_for_every_solver(sampler):
    """Every model call sees the exact given latents (else the velocity is NaN), the sample has them exactly, and on
    a per-coordinate velocity field the generated positions are what unmasked sampling gives."""
    x0, noise, mask, _ = _data()
    given = x0 * 0.3 + MU  # anything: what matters is that it is kept

    def velocity(x, t, scale, t_next=None):  # FLOW_MAP passes t_next: on this instantaneous velocity it is Euler
        m = masked.given_positions(mask)[..., None]  # (B, t, h, w, 1)
        drift = jnp.any(jnp.where(m, x != given, False))  # a given position that moved
        return exact_velocity(x, t) * scale + jnp.where(drift, jnp.nan, 0.0)

    run = jax.jit(lambda n: masked.sample_masked(velocity, n, given, mask, num_steps=6, sampler=sampler,
                                                 shift=3.0, args=(jnp.float32(1.0),)))
    out = np.asarray(run(noise))
    assert np.isfinite(out).all()
    m = np.asarray(mask)[..., None] & np.ones(SHAPE, bool)
    np.testing.assert_array_equal(out[m], np.asarray(given)[m])
    plain = samplers.sample(lambda x, t, s, t_next=None: exact_velocity(x, t) * s, noise, num_steps=6, sampler=sampler,
                            shift=3.0, args=(jnp.float32(1.0),))
    np.testing.assert_allclose(out[~m], np.asarray(plain)[~m], rtol=1e-5, atol=1e-5)


def test_flow_map_through_sample_masked_forwards_t_next_and_keeps_given_positions():
    """One FLOW_MAP step with the exact average velocity (x - x0) / t of the point x0 (keyword t_next required):
    the generated positions land on x0, the given ones stay exactly at `given`."""
    x0, noise, mask, _ = _data()
    given = x0 * 0.3 + MU
    average = lambda x, t, *, t_next: (x - x0) / t + 0.0 * t_next  # noqa: E731  (TypeError without t_next)
    out = np.asarray(masked.sample_masked(average, noise, given, mask, num_steps=1, sampler=samplers.Sampler.FLOW_MAP))
    m = np.asarray(mask)[..., None] & np.ones(SHAPE, bool)
    np.testing.assert_array_equal(out[m], np.asarray(given)[m])
    np.testing.assert_allclose(out[~m], np.asarray(x0)[~m], rtol=1e-5, atol=1e-5)
