"""The step guard: a non-finite or spiking step is not applied (inside the compiled step), counted, and stops the
run after `max_nonfinite_steps`; NaN at step k with keep=2 leaves both kept checkpoints finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fault_fixtures import (
    BATCH,
    NAN,
    Linear4,
    leaves,
    records,
    run_toy,
    saved_states,
    toy_loss,
    toy_spec,
)

from klingjax.config import ConfigError, to_experiment
from klingjax.sharding.rules import get_rules
from klingjax.train import guard as step_guard
from klingjax.train.state import create_trainer
from klingjax.train.step import compile_train_step, make_train_step

# ---------------------------------------------------------------------------------------------------------
# The guard inside the compiled step
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_step(mesh):
    st = create_trainer(Linear4, optax.adam(0.05), mesh, get_rules("fsdp", "dit"), 0, guard_window=4)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def batch(seed, scale=1.0):
        x = np.random.default_rng(seed).standard_normal((BATCH, 4)).astype(np.float32) * scale
        return {"x": jax.device_put(x, sharding)}

    def compiled(guard):
        with jax.set_mesh(mesh):
            return compile_train_step(make_train_step(st.graphdef, toy_loss, ema_decay=0.9, guard=guard),
                                      st.shardings, mesh)

    return st, batch, compiled


def _copy(state):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


@pytest.mark.parametrize("spike_factor", [0.0, 100.0])
def test_guard_without_faults_is_bit_identical(toy_step, spike_factor):
    """The selects do not change numerics: model, Adam moments, step and EMA equal the unguarded step's bit for bit."""
    st, batch, compiled = toy_step
    plain, guarded = compiled(None), compiled(step_guard.GuardConfig(spike_factor=spike_factor))
    a, b = _copy(st.state), _copy(st.state)
    for s in range(6):
        a, _ = plain(a, batch(s), jax.random.key(0))
        b, metrics = guarded(b, batch(s), jax.random.key(0))
        assert int(metrics["skipped"]) == 0
    for part in ("model", "optimizer", "ema"):
        for x, y in zip(leaves(a[part]), leaves(b[part]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert int(b["optimizer"]["step"][...]) == 6


def test_a_nan_step_is_not_applied_and_is_counted(toy_step):
    st, batch, compiled = toy_step
    step_fn = compiled(step_guard.GuardConfig())
    state = _copy(st.state)
    state, _ = step_fn(state, batch(0), jax.random.key(0))
    before = leaves(state)
    state, metrics = step_fn(state, batch(1, scale=NAN), jax.random.key(0))
    assert np.isnan(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    after = leaves(state)
    guard_keys = {id(x) for x in jax.tree.leaves(state["guard"])}
    kept = [x for x, y in zip(jax.tree.leaves(state), after) if id(x) not in guard_keys]
    assert len(kept) == len(after) - len(jax.tree.leaves(state["guard"]))
    for x, y, leaf in zip(before, after, jax.tree.leaves(state)):
        if id(leaf) not in guard_keys:  # model, optimizer (its step counter too), EMA: untouched
            np.testing.assert_array_equal(x, y)
    rep = step_guard.report(state)
    assert (rep["skipped"], rep["streak"], rep["worst_streak"], rep["worst_start"]) == (1, 1, 1, 2)
    assert step_guard.REASONS[rep["worst_reason"]] == "loss is not finite"
    assert int(state["optimizer"]["step"][...]) == 1  # the schedule and fold_in did not advance
    state, metrics = step_fn(state, batch(2), jax.random.key(0))
    assert int(metrics["skipped"]) == 0 and int(state["optimizer"]["step"][...]) == 2
    rep = step_guard.report(state)
    assert (rep["skipped"], rep["streak"], rep["worst_streak"]) == (1, 0, 1)


def test_a_loss_spike_is_skipped_once_the_window_is_full(toy_step):
    st, batch, compiled = toy_step
    step_fn = compiled(step_guard.GuardConfig(spike_factor=5.0))
    state = _copy(st.state)
    for s in range(4):  # fills the window of 4 accepted losses
        state, metrics = step_fn(state, batch(s), jax.random.key(0))
        assert int(metrics["skipped"]) == 0
    state, metrics = step_fn(state, batch(9, scale=100.0), jax.random.key(0))  # ~10^4 x the loss
    assert int(metrics["skipped"]) == 1
    rep = step_guard.report(state)
    assert step_guard.REASONS[rep["worst_reason"]] == "loss spike" and rep["worst_median"] > 0
    assert rep["worst_loss"] > 5.0 * rep["worst_median"]
    message = step_guard.stop_message("toy", rep, 0, 4)
    assert "loss spike at step 5" in message and "running median" in message


def test_guard_config_keys_are_validated():
    for key, value, match in (("max_nonfinite_steps", -1, "dit.max_nonfinite_steps"),
                              ("loss_spike_factor", 0.5, "dit.loss_spike_factor"),
                              ("loss_spike_window", 0, "dit.loss_spike_window")):
        with pytest.raises(ConfigError, match=match):
            to_experiment({"dit": {key: value}})
    exp = to_experiment({"vae": {"max_nonfinite_steps": 3, "loss_spike_factor": 4.0, "loss_spike_window": 16}})
    assert (exp.vae.max_nonfinite_steps, exp.vae.loss_spike_factor, exp.vae.loss_spike_window) == (3, 4.0, 16)


# ---------------------------------------------------------------------------------------------------------
# NaN at step k through the train loop (keep=2)
# ---------------------------------------------------------------------------------------------------------


def test_nan_at_step_k_stops_the_run_and_both_kept_checkpoints_are_finite(tmp_path, mesh):
    with pytest.raises(step_guard.NonFiniteStepError) as info:
        run_toy(tmp_path, mesh, toy_spec(nan_steps=(7,)), max_nonfinite_steps=0)
    message = str(info.value)
    assert message.startswith("toy: stopping: loss is not finite at step 7 (loss=nan")
    assert "toy.max_nonfinite_steps=0" in message and "the last one is step 6" in message
    states = saved_states(tmp_path, mesh)
    assert sorted(states) == [4, 6]  # keep=2; nothing was written after the fault
    assert all(step_guard.state_is_finite(s) for s in states.values())
    assert records(tmp_path)[-1]["stopped"] == message


def test_nan_at_step_k_is_skipped_and_the_run_recovers(tmp_path, mesh):
    summary = run_toy(tmp_path, mesh, toy_spec(nan_steps=(7,)), max_nonfinite_steps=3)
    assert summary["finished"] and summary["skipped_steps"] == 1
    states = saved_states(tmp_path, mesh)
    assert sorted(states) == [8, 10]
    assert all(step_guard.state_is_finite(s) for s in states.values())
    assert int(states[10]["optimizer"]["step"][...]) == 9  # 10 batches, 9 applied updates
    by_step = {r["step"]: r for r in records(tmp_path)}
    assert by_step[7]["skipped"] == 1 and np.isnan(by_step[7]["loss"]) and by_step[10]["skipped_steps"] == 1
    assert by_step[8]["skipped"] == 0 and np.isfinite(by_step[8]["loss"])


def test_a_persistent_fault_stops_after_max_nonfinite_steps(tmp_path, mesh):
    """A NaN tied to the optimizer step repeats (a skipped step does not advance it): 4 skips > 3 stop the run."""
    with pytest.raises(step_guard.NonFiniteStepError, match=r"at step 4 .* 4 consecutive step\(s\) skipped"):
        run_toy(tmp_path, mesh, toy_spec(nan_at_optimizer_step=3), max_nonfinite_steps=3)
    states = saved_states(tmp_path, mesh)
    assert sorted(states) == [4, 6]  # steps 4..7 were skipped: step 6 holds the state after step 3
    assert all(step_guard.state_is_finite(s) for s in states.values())


def test_resume_after_a_skipped_step_is_exact(tmp_path, mesh):
    straight = run_toy(tmp_path / "a", mesh, toy_spec(nan_steps=(3,)), max_nonfinite_steps=1)
    first = run_toy(tmp_path / "b", mesh, toy_spec(nan_steps=(3,)), max_nonfinite_steps=1, max_steps_per_run=5)
    assert not first["finished"]
    resumed = run_toy(tmp_path / "b", mesh, toy_spec(nan_steps=(3,)), max_nonfinite_steps=1)
    assert resumed["start_step"] == 5 and straight["skipped_steps"] == resumed["skipped_steps"] == 1
    a, b = saved_states(tmp_path / "a", mesh)[10], saved_states(tmp_path / "b", mesh)[10]
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
