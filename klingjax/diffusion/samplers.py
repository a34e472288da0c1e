"""ODE samplers for rectified flow (t from 1 = noise to 0 = data).

A velocity function `velocity_fn(x, t, *args) -> v` with t a scalar array is all a sampler needs;
`args` (e.g. model params) travel through the loop carry, so functions that must be traced inside the
loop (NNX modules merged from state) can be rebuilt there. Classifier-free guidance (negative prompts, several
conditions) happens inside `velocity_fn`: see diffusion/guidance.py.

Solvers (model evaluations for N steps): Euler (N), Heun (2N), DPM-Solver++(2M) (N), UniPC (N: a 2nd-order
predictor plus a corrector that reuses the next step's evaluation) and FLOW_MAP (N). The multistep solvers work in
data prediction x0 = x - t v with alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t), evaluate t = 1 as
1 - 1e-4 (lambda is -inf there), and return the last data prediction on the final step into t = 0 (no evaluation at
t = 0). FLOW_MAP is for flow-map (MeanFlow-style) students that predict the average velocity over a jump t -> t_next:
its velocity function is called as `velocity_fn(x, t, *args, t_next=t_next)` (t_next a scalar array, < t) and must
accept that keyword; each step is x + (t_next - t) * v, exact in one step for an exact average velocity.
"""

from __future__ import annotations

import enum
import math
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
    UNIPC = "unipc"
    FLOW_MAP = "flow_map"


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


def _flow_map(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    """Euler on the average velocity of a flow-map model, told where each jump ends by the keyword `t_next`."""

    def step(carry, i):
        x, args = carry
        t, t_next = ts[i], ts[i + 1]
        return (x + (t_next - t) * velocity_fn(x, t, *args, t_next=t_next), args), None

    (x, _), _ = jax.lax.scan(step, (x, args), jnp.arange(ts.shape[0] - 1))
    return x


def _log_snr(t: jax.Array) -> jax.Array:
    """lambda_t = log(alpha_t / sigma_t) = log((1 - t) / t), finite (clipped) at t = 0 and 1."""
    t = jnp.clip(t, 1e-6, 1.0 - 1e-6)
    return jnp.log1p(-t) - jnp.log(t)


def _dpmpp_2m(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    """DPM-Solver++(2M) in data prediction for the flow x_t = (1-t) x0 + t e (alpha = 1-t, sigma = t)."""

    def step(carry, i):
        x, d_prev, h_prev, args = carry
        t, t_next = ts[i], ts[i + 1]
        t_eval = jnp.minimum(t, 1.0 - 1e-4)
        d = x - t_eval * velocity_fn(x, t_eval, *args)  # predicted x0
        h = _log_snr(t_next) - _log_snr(t_eval)
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


def _phi_2_3(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """phi_2(u) = (e^u - 1 - u) / u^2 and phi_3(u) = (e^u - 1 - u - u^2/2) / u^3, by their Taylor series near 0.

    The closed forms lose ~eps / |u|^k to cancellation: in float32 phi_3 is off by 0.03% at |u| = 0.05 (~100 steps
    of lambda) and 1% at 0.01 (~500 steps); the series to u^6 is accurate to ~1e-7 for |u| < 0.5.
    """
    small = jnp.abs(u) < 0.5
    us = jnp.where(small, u, 0.0)
    series = [sum(us**j / math.factorial(j + k) for j in range(7)) for k in (2, 3)]
    ub = jnp.where(small, 1.0, u)  # the closed forms only where |u| >= 0.5 (no division by ~0 in the other branch)
    exact2 = (jnp.expm1(ub) - ub) / ub**2
    exact3 = (exact2 - 0.5) / ub
    return jnp.where(small, series[0], exact2), jnp.where(small, series[1], exact3)


def _unipc(velocity_fn: VelocityFn, x: jax.Array, ts: jax.Array, args: tuple) -> jax.Array:
    """UniPC-bh2 (Zhao et al. 2023), order 2, data prediction, lower order on the first and last steps.

    What diffusers' UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True,
    lower_order_final=True) does on this flow. Step i evaluates m_i = x0(x_i, t_i) once, then
      * corrector UniC (i > 0): redo the step t_{i-1} -> t_i from the corrected x_{i-1} with m_i added to the
        history (order 1 after the first step, else 2); m_i itself stays the one evaluated at the predicted x_i;
      * predictor UniP: step t_i -> t_{i+1} from the corrected x_i; order 1 on the first step, else 2, which for
        bh2 is exactly DPM-Solver++(2M)'s update. The last step (into t = 0) returns m_{N-1}.
    Both have the form x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) (m + sum_k rho_k D_k), with
    h = lambda_next - lambda (> 0), D_k the differences of the data predictions over r_k = (lambda_k - lambda) / h,
    and the rho_k of bh2 (B(h) = e^{-h} - 1).
    """
    n = ts.shape[0] - 1
    ts = jnp.minimum(ts, 1.0 - 1e-4)  # t_0 = 1 evaluated as 1 - 1e-4 (sigma ratios and lambdas use the same t)
    lam = _log_snr(ts)  # (n + 1,)

    def step(carry, i):
        x, x_prev, m_prev, m_prev2, args = carry  # x_i predicted; x_{i-1} corrected; m_{i-1}, m_{i-2}
        t, t_prev, t_next = ts[i], ts[jnp.maximum(i - 1, 0)], ts[i + 1]
        m = x - t * velocity_fn(x, t, *args)  # data prediction at the predicted x_i: the one evaluation

        # Corrector UniC-bh2 for the step t_{i-1} -> t_i, with the history m_{i-2}, m_{i-1} and the new m_i.
        h = lam[i] - lam[jnp.maximum(i - 1, 0)]
        h = jnp.where(i > 0, h, 1.0)  # (step 0 has nothing to correct: any finite h)
        r = (lam[jnp.maximum(i - 2, 0)] - lam[jnp.maximum(i - 1, 0)]) / h  # < 0: the older point lies behind
        r = jnp.where(i > 1, r, -1.0)  # (no m_{i-2} before step 2: r would be 0 and 0 * inf NaN)
        phi2, phi3 = _phi_2_3(-h)
        phi1 = jnp.expm1(-h) / -h
        b1, b2 = phi2 / phi1, 2.0 * phi3 / phi1
        # Order 2 solves [[1, 1], [r, 1]] (rho_0, rho_1) = (b1, b2); order 1 (only m_{i-1} behind) has rho_1 = 1/2.
        rho0 = jnp.where(i > 1, (b1 - b2) / (1.0 - r), 0.0)
        rho1 = jnp.where(i > 1, b1 - rho0, 0.5)
        d_hist = (m_prev2 - m_prev) / r
        x_corr = (t / t_prev) * x_prev - (1.0 - t) * jnp.expm1(-h) * (m_prev + rho0 * d_hist + rho1 * (m - m_prev))
        x = jnp.where(i > 0, x_corr, x)

        # Predictor UniP-bh2 for t_i -> t_{i+1}: rho = 1/2 on D = (m_{i-1} - m_i) / r_p, r_p = (lam_{i-1} - lam_i) / h.
        h = lam[i + 1] - lam[i]
        r = (lam[jnp.maximum(i - 1, 0)] - lam[i]) / h
        second = (i > 0) & (i < n - 1)
        d_use = m + jnp.where(second, 0.5 * (m_prev - m) / jnp.where(second, r, -1.0), 0.0)
        x_next = (t_next / t) * x - (1.0 - t_next) * jnp.expm1(-h) * d_use
        x_next = jnp.where(t_next > 0, x_next, m)
        return (x_next, x, m, m_prev, args), None

    zeros = jnp.zeros_like(x)
    (x, _, _, _, _), _ = jax.lax.scan(step, (x, zeros, zeros, zeros, args), jnp.arange(n))
    return x


_SOLVERS = {
    Sampler.EULER: _euler,
    Sampler.HEUN: _heun,
    Sampler.DPM_SOLVER_PP_2M: _dpmpp_2m,
    Sampler.UNIPC: _unipc,
    Sampler.FLOW_MAP: _flow_map,
}


def sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    *,
    num_steps: int,
    sampler: Sampler = Sampler.EULER,
    shift: float = 1.0,
    args: tuple = (),
) -> jax.Array:
    """Integrate from t = 1 (`noise`) to t = 0 and return the sample; `velocity_fn(x, t, *args)`.

    Sampler.FLOW_MAP calls `velocity_fn(x, t, *args, t_next=t_next)` instead (see the module docstring).
    """
    ts = sampling_timesteps(num_steps, shift).astype(noise.dtype)
    return _SOLVERS[sampler](velocity_fn, noise, ts, tuple(args))
