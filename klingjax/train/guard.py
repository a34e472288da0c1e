"""Step guard: a step whose loss or gradient norm is not finite (or whose loss spikes) is not applied.

Inside the compiled step (`make_train_step`), `decide` computes one boolean `ok` from the step's loss and gradient
norms, and `select` keeps the new state where `ok` and the old one elsewhere, leaf by leaf (`jnp.where`): model,
optimizer moments, EMA, the discriminator and the optimizer step counter alike. A skipped step therefore does not
advance the optimizer step, so the learning-rate schedule, `fold_in(base_key, step)` and the EMA warm-up continue
from where the last applied step left them (as `optax.apply_if_finite` does); the batch it drew is consumed. The
loop's step numbers (checkpoint names, `steps`) count batches, so after skips optimizer step = loop step - skipped.

The bookkeeping (`StepGuard`, a sub-module of the trainer, checkpointed with it so resume stays exact) counts skips
and consecutive skips and remembers the longest streak; the loop reads it at every metric fetch and before every
checkpoint save (a few scalars) and stops the run with `NonFiniteStepError` once a streak exceeds
`max_nonfinite_steps`. No host sync per step. With no fault `ok` is True and `where(True, new, old)` is `new`
bit for bit, so the guard does not change training numerics.

Loss spikes (off by default): a loss above `spike_factor` x the median of the last `window` accepted losses (a ring
buffer in `StepGuard`) is treated like a non-finite one, once the buffer is full and its median is positive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Why a step was skipped (`StepGuard.worst_reason`).
REASONS = ("", "loss is not finite", "grad_norm is not finite", "loss spike")
NONFINITE_LOSS, NONFINITE_GRAD, SPIKE = 1, 2, 3


class NonFiniteStepError(RuntimeError):
    """Training stopped: too many consecutive steps were skipped (non-finite or spiking loss / gradients)."""


class GuardVariable(nnx.Variable):
    """Step-guard bookkeeping: checkpointed with the trainer, never trained."""


class StepGuard(nnx.Module):
    """Skip counters and the ring buffer of recent accepted losses (all scalars but `losses` (window,))."""

    def __init__(self, window: int = 32):
        i32 = lambda: GuardVariable(jnp.zeros((), jnp.int32))
        f32 = lambda: GuardVariable(jnp.zeros((), jnp.float32))
        self.skipped = i32()  # steps skipped in total
        self.streak = i32()  # consecutive skipped steps ending at the latest step
        # The first skipped step of the current streak: its loop step (1-based), reason (index into REASONS), values.
        self.start, self.reason = i32(), i32()
        self.loss, self.grad_norm, self.median = f32(), f32(), f32()
        # The longest streak so far and the same record of its first step (what a stop message names).
        self.worst_streak, self.worst_start, self.worst_reason = i32(), i32(), i32()
        self.worst_loss, self.worst_grad_norm, self.worst_median = f32(), f32(), f32()
        self.losses = GuardVariable(jnp.zeros((max(1, window),), jnp.float32))  # ring buffer of accepted losses
        self.accepted = i32()  # losses pushed into the ring buffer so far


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """What the compiled step checks; `spike_factor` 0: no spike detection (the ring buffer is left untouched)."""

    spike_factor: float = 0.0


DEFAULT_GUARD = GuardConfig()


def decide(guard: StepGuard, loss: jax.Array, grad_norms: list[jax.Array], cfg: GuardConfig):
    """(ok, reason, median): whether to apply this step; `loss` is the model's reported loss."""
    loss = loss.astype(jnp.float32)
    finite_loss = jnp.isfinite(loss)
    finite_grads = jnp.all(jnp.stack([jnp.isfinite(g) for g in grad_norms]))
    median = jnp.zeros((), jnp.float32)
    spike = jnp.zeros((), bool)
    if cfg.spike_factor > 0:
        losses = guard.losses[...]
        median = jnp.median(losses)
        full = guard.accepted[...] >= losses.shape[0]
        spike = full & (median > 0) & (loss > cfg.spike_factor * median)
    reason = jnp.where(~finite_loss, NONFINITE_LOSS, jnp.where(~finite_grads, NONFINITE_GRAD,
                                                               jnp.where(spike, SPIKE, 0)))
    return reason == 0, reason.astype(jnp.int32), median


def _where(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):  # typed keys: select their raw data
        data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(ok, new, old)


def select(ok: jax.Array, new: nnx.State, old_leaves: list[jax.Array]) -> nnx.State:
    """`new` where `ok`, else the old state (its leaves, flattened in the same order), leaf by leaf."""
    new_leaves, treedef = jax.tree.flatten(new)
    if len(new_leaves) != len(old_leaves):
        raise ValueError(f"step guard: the state has {len(new_leaves)} leaves after the step, {len(old_leaves)} before")
    return jax.tree.unflatten(treedef, [_where(ok, n, o) for n, o in zip(new_leaves, old_leaves)])


def record(guard: StepGuard, ok: jax.Array, reason: jax.Array, loss: jax.Array, grad_norm: jax.Array,
           median: jax.Array, loop_step: jax.Array, cfg: GuardConfig) -> None:
    """Update the counters (and, with spike detection, push an accepted loss) after the decision."""
    bad = (~ok).astype(jnp.int32)
    streak = (guard.streak[...] + 1) * bad
    guard.skipped[...] = guard.skipped[...] + bad
    guard.streak[...] = streak
    first = streak == 1
    values = {"start": loop_step.astype(jnp.int32), "reason": reason, "loss": loss.astype(jnp.float32),
              "grad_norm": grad_norm.astype(jnp.float32), "median": median.astype(jnp.float32)}
    for name, value in values.items():
        getattr(guard, name)[...] = jnp.where(first, value, getattr(guard, name)[...])
    longer = streak > guard.worst_streak[...]
    for name in values:
        worst = getattr(guard, f"worst_{name}")
        worst[...] = jnp.where(longer, getattr(guard, name)[...], worst[...])
    guard.worst_streak[...] = jnp.maximum(guard.worst_streak[...], streak)
    if cfg.spike_factor > 0:
        losses, n = guard.losses[...], guard.accepted[...]
        pushed = losses.at[n % losses.shape[0]].set(loss.astype(jnp.float32))
        guard.losses[...] = jnp.where(ok, pushed, losses)
        guard.accepted[...] = n + ok.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Host side: reports and the stop decision
# ---------------------------------------------------------------------------------------------------------


def report(state: nnx.State) -> dict[str, float | int]:
    """The guard's scalars from a trainer state (fetches a few scalars: a host sync)."""
    guard = jax.device_get(state["guard"])
    flat = {".".join(map(str, path)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in nnx.to_flat_state(guard)}
    return {k: v.item() for k, v in flat.items() if v.ndim == 0}


def stop_message(stage: str, rep: dict[str, Any], max_nonfinite_steps: int, last_checkpoint: int | None) -> str | None:
    """The error message if the longest skip streak exceeds `max_nonfinite_steps`, else None."""
    if rep["worst_streak"] <= max_nonfinite_steps:
        return None
    reason = REASONS[int(rep["worst_reason"])]
    detail = f"loss={rep['worst_loss']:.6g}, grad_norm={rep['worst_grad_norm']:.6g}"
    if int(rep["worst_reason"]) == SPIKE:
        detail += f", running median={rep['worst_median']:.6g}"
    kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
    return (f"{stage}: stopping: {reason} at step {rep['worst_start']} ({detail}); {rep['worst_streak']} consecutive "
            f"step(s) skipped, more than {stage}.max_nonfinite_steps={max_nonfinite_steps} "
            f"({rep['skipped']} skipped in all). No skipped step was applied, so every checkpoint holds finite params; "
            f"the last one is {kept}. Check the data and lower the lr, then rerun to resume.")


def state_is_finite(state: nnx.State) -> bool:
    """Whether a trainer state's model, optimizer, EMA (and discriminator) are finite; the guard's own record may
    hold the NaN loss of a skipped step. One jitted reduction; one scalar comes back."""
    return bool(all_finite({k: state[k] for k in state if k != "guard"}))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (one reduction pass; a scalar comes back)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.ones((), bool)
