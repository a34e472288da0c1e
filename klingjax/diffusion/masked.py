"""Masked video diffusion: some latent positions are given (clean), the rest are generated.

Image / first-last-frame / keyframes to video, extension and inpainting are all one pattern: a mask over the latent
grid saying which positions are given (DESIGN.md section 4; the patterns are in data/tasks.py). These pure functions
keep the given positions clean wherever the rectified flow x_t = (1 - t) x0 + t e touches them:
  * `apply_given`: overwrite the given positions of x with the clean latents;
  * `masked_flow_loss`: the model sees the clean latents at given positions, and the loss is the mean over the
    generated positions only (no gradient reaches the predictions at given positions);
  * `masked_velocity` / `sample_masked`: every model evaluation of every solver (samplers.Sampler) sees the exact
    clean latents at the given positions, and the sample returned has them exactly.
Masks are (B, t, h, w) bool, or float with >= 0.5 = given; latents (B, t, h, w, C). This module imports no model:
`velocity_fn(x, t, *args)` closes over it (how the model is told which positions are given is its ConditionSpec).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from klingjax.diffusion import losses, samplers
from klingjax.diffusion.guidance import chained_guidance
from klingjax.diffusion.samplers import VelocityFn


def given_positions(mask: jax.Array) -> jax.Array:
    """The boolean "given" mask of a bool mask, or of a float one thresholded at 0.5 (LTX-2's rule)."""
    return mask if mask.dtype == jnp.bool_ else mask >= 0.5


def _expand(mask: jax.Array, x: jax.Array) -> jax.Array:
    """A (B, t, h, w) mask -> (B, t, h, w, 1) bool, broadcastable against latents x (B, t, h, w, C)."""
    if mask.shape != x.shape[: mask.ndim] or x.ndim - mask.ndim not in (0, 1):
        raise ValueError(f"a given mask of shape {mask.shape} does not match latents of shape {x.shape}")
    m = given_positions(mask)
    return m if m.ndim == x.ndim else m[..., None]


def apply_given(x: jax.Array, given: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, t, h, w, C) with the positions where `mask` (B, t, h, w) is given replaced by `given` (same shape as x)."""
    return jnp.where(_expand(mask, x), given.astype(x.dtype), x)


def masked_flow_loss(
    predict_velocity,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    given_mask: jax.Array | None,
    *,
    weighting: losses.LossWeighting = losses.LossWeighting.NONE,
    clean_inputs: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """`losses.flow_matching_loss` with the positions of `given_mask` (B, t, h, w) given: (loss, per-sample (B,)).

    The loss is the mean over the generated positions only; clean_inputs: the model input at given positions is x0
    (in-place conditioning, Wan 2.2 TI2V / LTX; channel-concat models may keep the noisy input there, False).
    given_mask None: exactly `flow_matching_loss`.
    """
    if given_mask is None:
        return losses.flow_matching_loss(predict_velocity, x0, noise, t, weighting=weighting)
    predict = predict_velocity
    if clean_inputs:
        predict = lambda x_t, t: predict_velocity(apply_given(x_t, x0, given_mask), t)  # noqa: E731
    generated = ~given_positions(given_mask)  # (B, t, h, w)
    return losses.flow_matching_loss(predict, x0, noise, t, weighting=weighting, loss_mask=generated)


def masked_velocity(velocity_fn: VelocityFn, given: jax.Array, mask: jax.Array) -> VelocityFn:
    """`velocity_fn(x, t, *args)` that sees x with the given positions clean and returns velocity 0 there.

    Clean inputs make every model evaluation exact for any solver, whatever rounding does to the solver's state at
    the given positions (Euler, Heun and FLOW_MAP keep it bit-exact through velocity 0; the data-prediction updates of
    DPM++ and UniPC keep it only up to rounding), and `sample_masked` overwrites them in the result.
    """

    def fn(x, t, *args, **kwargs):  # kwargs: e.g. the t_next of Sampler.FLOW_MAP
        v = velocity_fn(apply_given(x, given, mask), t, *args, **kwargs)
        return jnp.where(_expand(mask, v), jnp.zeros((), v.dtype), v)

    return fn


def sample_masked(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    given: jax.Array,
    mask: jax.Array,
    *,
    num_steps: int,
    sampler: samplers.Sampler = samplers.Sampler.EULER,
    shift: float = 1.0,
    args: tuple = (),
) -> jax.Array:
    """`samplers.sample` from `noise` with the positions of `mask` (B, t, h, w) held at `given` (B, t, h, w, C)."""
    x = samplers.sample(masked_velocity(velocity_fn, given, mask), apply_given(noise, given, mask),
                        num_steps=num_steps, sampler=sampler, shift=shift, args=args)
    return apply_given(x, given, mask)


def guided_velocity(model_fn, x: jax.Array, t: jax.Array, cond, uncond, text_scale, visual_scale=1.0,
                    noise: jax.Array | None = None) -> jax.Array:
    """The guided velocity of generation and of distillation teachers: `model_fn(x, t (B,), cond) -> v` with t the
    flow time in [0, 1]; `cond` / `uncond` (the negative prompt) are `Conditions`-like pytrees with `.given` /
    `.given_mask` fields.

    Without a given mask: CFG, v_u + text_scale (v_c - v_u). With one (masked video): chained guidance full ->
    negative prompt with the visual condition (text_scale) -> negative prompt without it (visual_scale), every
    branch seeing its given positions clean; the branch without the visual condition sees them on the noise path
    (1 - t) given + t noise (`noise`: the sample's starting noise), as training's visual dropout showed it those
    clips. Branches of scale 1 are not evaluated (`guidance.chained_guidance`).
    """
    t = jnp.broadcast_to(t, (x.shape[0],))
    if cond.given_mask is None:
        return chained_guidance(model_fn, x, t, cond, [(uncond, text_scale)])
    given, mask = cond.given, cond.given_mask
    neg = uncond.replace(given=given, given_mask=mask)
    bare = neg.replace(given_mask=jnp.zeros_like(mask))  # no visual condition: every position generated
    tb = t.reshape(t.shape + (1,) * (x.ndim - 1))
    x = apply_given(x, (1.0 - tb) * given + tb * noise, mask)
    model = lambda x, t, c: model_fn(apply_given(x, c.given, c.given_mask), t, c)  # noqa: E731
    return chained_guidance(model, x, t, cond, [(neg, text_scale), (bare, visual_scale)])
