"""Few-step distillation targets for rectified-flow students (the math of klingjax/train/distill.py; no model here).

The flow is x_t = (1 - t) x0 + t e (t = 1 noise, t = 0 data) and `velocity_fn(x, t) -> v` is the teacher's
velocity with classifier-free guidance already applied (so the student folds the guidance in: one evaluation per
step), t (B,) per sample. Two methods, compared in the distill stage:

  * TRAJECTORY: progressive distillation in one round (Salimans & Ho 2022; Meng et al. 2023 for guided models) with
    K teacher steps per student step: the student's grid is `sampling_timesteps(n, shift)`, the teacher's is the
    n*K-step grid that nests it (every K-th point is the student's), and a student step from t_i to t_{i+1} is
    trained to the velocity that lands where the teacher's K Euler steps land:
        v* = (Phi_teacher(x_{t_i}; t_i -> t_{i+1}) - x_{t_i}) / (t_{i+1} - t_i).
    The student is a plain DiT (same architecture as the teacher: it exports to diffusers) sampled with Euler on
    exactly that grid.
  * SHORTCUT: a flow-map student trained level by level (shortcut models, Frans et al. 2025; MAGI-1's shortcut
    distillation): for step counts n, 2n, 4n, ..., N, a jump of the N-step grid is trained to the teacher's K Euler
    steps (as TRAJECTORY), and a jump t -> r of a coarser n-step grid to the student's own two jumps of the 2n-step
    grid, t -> m -> r (m the midpoint the finer grid puts between them), stop-gradient'ed:
        u* = ((t - m) u(x_t, t, t - m) + (m - r) u(x_m, m, m - r)) / (t - r),   x_m = x_t - (t - m) u(x_t, t, t - m).
    No derivatives: every target is a composition of evaluations, so it cannot blow up the way MeanFlow's can.
  * MEAN_FLOW: a flow-map student (MeanFlow, Geng et al. 2025) predicts the average velocity over a jump,
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds, from the MeanFlow identity
        u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + d_t u,
    where the total derivative along the teacher's trajectory is ONE forward-mode product (`jax.jvp`, tangents
    (v, 1, 1) for (z, t, h = t - r)); the target is stop-gradient'ed. The student reads h through
    `Conditions.interval` (a zero-initialised embedding: at init it is its teacher) and samples any step count
    with `Sampler.FLOW_MAP` (x_r = x_t - (t - r) u).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp

from klingjax.diffusion.schedules import sampling_timesteps, time_shift


class DistillMethod(enum.Enum):
    """How the distill stage trains its student (see the module docstring)."""

    TRAJECTORY = "trajectory"
    MEAN_FLOW = "mean_flow"
    SHORTCUT = "shortcut"

    @property
    def flow_map(self) -> bool:
        """Whether the student reads the jump length (`Conditions.interval`) and samples with Sampler.FLOW_MAP."""
        return self is not DistillMethod.TRAJECTORY


def expand_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example times (B,) -> (B, 1, ..., 1), broadcastable against x (B, ...)."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def trajectory_times(key: jax.Array, batch: int, student_steps: int, teacher_steps: int,
                     shift: float) -> tuple[jax.Array, jax.Array]:
    """A random student step per example: (its index i (B,) int32, the teacher's times (B, K + 1) from t_i down to
    t_{i+1}), K = teacher_steps / student_steps, on the nested grids of `sampling_timesteps`."""
    if teacher_steps % student_steps:
        raise ValueError(f"teacher_steps {teacher_steps} must be a multiple of student_steps {student_steps}")
    k = teacher_steps // student_steps
    fine = sampling_timesteps(teacher_steps, shift)  # (n K + 1,)
    i = jax.random.randint(key, (batch,), 0, student_steps)
    return i, fine[i[:, None] * k + jnp.arange(k + 1)[None, :]]  # (B,), (B, K + 1)


def teacher_jump(velocity_fn: Callable[..., jax.Array], x: jax.Array, times: jax.Array, args: tuple = ()) -> jax.Array:
    """Euler steps of `velocity_fn(x, t (B,), *args)` along each example's `times` (B, K + 1) (descending): x at
    times[:, -1]. `args` (e.g. the teacher's params) ride in the loop carry, as in diffusion/samplers.py."""

    def step(carry, k):
        x, args = carry
        t, t_next = times[:, k], times[:, k + 1]
        return (x + expand_time(t_next - t, x) * velocity_fn(x, t, *args).astype(x.dtype), args), None

    (x, _), _ = jax.lax.scan(step, (x, tuple(args)), jnp.arange(times.shape[1] - 1))
    return x


def trajectory_target(velocity_fn: Callable[..., jax.Array], x_t: jax.Array, times: jax.Array,
                      args: tuple = ()) -> jax.Array:
    """The student's velocity target at x_t, times[:, 0]: (teacher_jump - x_t) / (t_next - t), (B, ...)."""
    x_next = teacher_jump(velocity_fn, x_t, times, args)
    return (x_next - x_t) / expand_time(times[:, -1] - times[:, 0], x_t)


def grid_point(j: jax.Array, n: jax.Array, shift: float) -> jax.Array:
    """`sampling_timesteps(n, shift)[j]` per example: j, n (B,) int."""
    return time_shift(1.0 - j.astype(jnp.float32) / n.astype(jnp.float32), shift)


def shortcut_times(key: jax.Array, batch: int, counts: tuple[int, ...],
                   shift: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, m, r) (B,) each: a jump t -> r of an n-step grid, n drawn uniformly from `counts` (each of which the
    student also learns at 2n steps), and m, the point of the 2n-step grid between them."""
    k_n, k_i = jax.random.split(key)
    levels = jnp.asarray(counts, jnp.int32)
    n = levels[jax.random.randint(k_n, (batch,), 0, len(counts))]
    i = jnp.floor(jax.random.uniform(k_i, (batch,)) * n).astype(jnp.int32)
    return grid_point(i, n, shift), grid_point(2 * i + 1, 2 * n, shift), grid_point(i + 1, n, shift)


def shortcut_target(avg_velocity_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x_t: jax.Array,
                    t: jax.Array, m: jax.Array, r: jax.Array) -> jax.Array:
    """The average velocity of two consecutive jumps t -> m -> r of `avg_velocity_fn(x, t, h)` (B, ...)."""
    u1 = avg_velocity_fn(x_t, t, t - m)
    x_m = x_t - expand_time(t - m, x_t) * u1
    u2 = avg_velocity_fn(x_m, m, m - r)
    return (expand_time(t - m, x_t) * u1 + expand_time(m - r, x_t) * u2) / expand_time(t - r, x_t)


def mean_flow_times(key: jax.Array, batch: int, student_steps: tuple[int, ...], shift: float,
                    instant_fraction: float) -> tuple[jax.Array, jax.Array]:
    """(t, r) (B,) each, t > r or t = r: with probability `instant_fraction` r = t with t uniform on (0, 1] shifted
    like the sampling grid (the teacher's instantaneous velocity), else a jump of one of the `student_steps` grids
    (a step count drawn uniformly, then one of its steps): the jumps a student sampled at those counts takes."""
    k_inst, k_n, k_i, k_t = jax.random.split(key, 4)
    counts = jnp.asarray(student_steps, jnp.int32)
    n = counts[jax.random.randint(k_n, (batch,), 0, len(student_steps))]  # (B,)
    i = jnp.floor(jax.random.uniform(k_i, (batch,)) * n).astype(jnp.int32)  # step index in [0, n)
    t_jump, r_jump = grid_point(i, n, shift), grid_point(i + 1, n, shift)
    u = jax.random.uniform(k_t, (batch,), minval=1e-3, maxval=1.0)
    t_inst = time_shift(u, shift)
    instant = jax.random.uniform(k_inst, (batch,)) < instant_fraction
    return jnp.where(instant, t_inst, t_jump), jnp.where(instant, t_inst, r_jump)


def mean_flow_target(u_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], z: jax.Array, t: jax.Array,
                     r: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(u, target) of the MeanFlow identity at z_t: u = u_fn(z, t, h = t - r) (differentiable w.r.t. whatever u_fn
    closes over) and the stop-gradient target v - (t - r) du/dt, du/dt from one `jax.jvp` with tangents (v, 1, 1).

    u_fn(z (B, ...), t (B,), h (B,)) -> (B, ...); v: the (teacher's) instantaneous velocity at (z, t).
    """
    h = t - r
    ones = jnp.ones_like(t)
    u, dudt = jax.jvp(u_fn, (z, t, h), (v.astype(z.dtype), ones, ones))
    target = v.astype(jnp.float32) - expand_time(h, z) * dudt.astype(jnp.float32)
    return u, jax.lax.stop_gradient(target)
