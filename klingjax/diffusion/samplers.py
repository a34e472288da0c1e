"""ODE samplers for rectified flow (t from 1 = noise to 0 = data).

A velocity function `velocity_fn(x, t, *args) -> v` with t a scalar array is all a sampler needs;
`args` (e.g. model params) travel through the loop carry, so functions that must be traced inside the
loop (NNX modules merged from state) can be rebuilt there. Classifier-free guidance (negative prompts, several
conditions) happens inside `velocity_fn`: see diffusion/guidance.py.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp

from klingjax.diffusion.schedules import sampling_timesteps

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


class Sampler(enum.Enum):
    """Available ODE solvers."""

    EULER = "euler"
    HEUN = "heun"
    DPM_SOLVER_PP_2M = "dpmpp_2m"


def _euler(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    def step(carry, i):
        x, args = carry
        t, t_next = ts[i], ts[i + 1]
        return (x + (t_next - t) * velocity_fn(x, t, *args), args), None

    (x, _), _ = jax.lax.scan(step, (x, args), jnp.arange(ts.shape[0] - 1))
    return x


def _heun(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    def step(carry, i):
        x, args = carry
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, t, *args)
        x_euler = x + (t_next - t) * v
        # Trapezoid correction, except on the last step into t = 0 where the model is not evaluated.
        v_next = velocity_fn(x_euler, jnp.maximum(t_next, 1e-4), *args)
        x_heun = x + (t_next - t) * 0.5 * (v + v_next)
        return (jnp.where(t_next > 0, x_heun, x_euler), args), None

    (x, _), _ = jax.lax.scan(step, (x, args), jnp.arange(ts.shape[0] - 1))
    return x


def _dpmpp_2m(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    """DPM-Solver++(2M) in data prediction for the flow x_t = (1-t) x0 + t e (alpha = 1-t, sigma = t)."""

    def lam(t):  # log-SNR: log(alpha / sigma)
        t = jnp.clip(t, 1e-6, 1.0 - 1e-6)
        return jnp.log1p(-t) - jnp.log(t)

    def step(carry, i):
        x, d_prev, h_prev, args = carry
        t, t_next = ts[i], ts[i + 1]
        t_eval = jnp.minimum(t, 1.0 - 1e-4)
        d = x - t_eval * velocity_fn(x, t_eval, *args)  # predicted x0
        h = lam(t_next) - lam(t_eval)
        r = h_prev / h
        d_2m = (1.0 + 1.0 / (2.0 * r)) * d - (1.0 / (2.0 * r)) * d_prev
        # First order on the first step (no history) and the last (lambda(0) is infinite, so r -> 0).
        d_use = jnp.where((i > 0) & (t_next > 0), d_2m, d)
        alpha_next, sigma_next = 1.0 - t_next, t_next
        x_next = (sigma_next / t_eval) * x - alpha_next * jnp.expm1(-h) * d_use
        x_next = jnp.where(t_next > 0, x_next, d_use)
        return (x_next, d, h, args), None

    init = (x, jnp.zeros_like(x), jnp.ones((), x.dtype), args)
    (x, _, _, _), _ = jax.lax.scan(step, init, jnp.arange(ts.shape[0] - 1))
    return x


_SOLVERS = {Sampler.EULER: _euler, Sampler.HEUN: _heun, Sampler.DPM_SOLVER_PP_2M: _dpmpp_2m}


def sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    *,
    num_steps: int,
    sampler: Sampler = Sampler.EULER,
    shift: float = 1.0,
    args: tuple = (),
) -> jax.Array:
    """Integrate from t = 1 (`noise`) to t = 0 and return the sample; `velocity_fn(x, t, *args)`."""
    ts = sampling_timesteps(num_steps, shift).astype(noise.dtype)
    return _SOLVERS[sampler](velocity_fn, noise, ts, tuple(args))
