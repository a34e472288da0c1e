"""One sectioned train loop for every stage: setup -> data -> state -> restore -> compile -> train -> save.

Faults: the compiled step skips non-finite (or spiking) steps (`klingjax.train.guard`); the loop reads the guard's
counters at every metric fetch and before every save, and raises `NonFiniteStepError` (saving nothing more) once
more than `max_nonfinite_steps` consecutive steps were skipped. Before each save the whole state is also checked
finite (one jitted reduction, one scalar fetched). Resume falls back past unreadable checkpoints
(`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from klingjax.config import StageConfig
from klingjax.layout import checkpoint_dir, stage_dir
from klingjax.models.dit import ADAPTER_PARAMS
from klingjax.sharding.rules import get_rules
from klingjax.train import guard as step_guard
from klingjax.train import trainable
from klingjax.train.batch import global_batch
from klingjax.train.checkpoint import (
    Checkpointer,
    PreemptionGuard,
    abstract_with_shardings,
    find_checkpoints,
    gather_iterator_states,
    local_iterator_state,
    restore_params,
    restore_state,
    saved_param_names,
)
from klingjax.train.metrics import MetricWriter
from klingjax.train.optim import learning_rate_schedule, make_optimizer
from klingjax.train.state import create_trainer, merge_trainer, own_state, param_count
from klingjax.train.step import LossFn, PlayerUpdate, batch_sharding, compile_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Player:
    """A second model trained beside the stage's model (the VAE's discriminator), on the same loss.

    It lives in the trainer as `disc` + `disc_optimizer` (top-level checkpoint keys beside model/optimizer/ema,
    which stay exactly the model's); the stage's `update` applies its gradients (e.g. only from a start step).
    """

    make: Callable[[nnx.Rngs], nnx.Module]
    tx: optax.GradientTransformation
    update: PlayerUpdate
    name: str = "discriminator"
    start: int = 0  # optimizer step from which `update` applies its gradients (for the log line)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What differs between stages: the model, its loss, its data and its samples."""

    name: str  # "vae" | "dit"; also the sub-directory of the workdir
    rules_kind: str  # which rule table: "vae" | "dit"
    make_model: Callable[[nnx.Rngs], nnx.Module]
    loss_fn: LossFn  # loss_fn(model, batch, key, ctx) -> (loss, metrics)
    # (per_host_batch, seed, process_index, process_count) -> grain.IterDataset of numpy example dicts
    make_dataset: Callable[[int, int, int, int], grain.IterDataset]
    to_batch: Callable[[Mapping[str, np.ndarray]], Any]  # a host's numpy example dict -> the typed batch pytree
    # (ema_model, step, out_dir) -> dict of scalar metrics, run on every host (sampling is collective)
    on_sample: Callable[[nnx.Module, int, str], Mapping[str, float]] | None = None
    player: Player | None = None
    # () -> pytree of frozen arrays the loss reads as ctx.frozen (LPIPS weights): loaded once, replicated, passed
    # to the jitted step as an argument (constants would be folded into the program); never trained or saved.
    frozen: Callable[[], Any] | None = None


def _fingerprint(local: Any) -> int:
    """A cheap checksum of the host's batch (its first leaf): equal fingerprints mean the same data order."""
    return zlib.adler32(np.ascontiguousarray(jax.tree.leaves(local)[0]).tobytes()[:1 << 16])


def _create_trainer(spec: StageSpec, cfg: StageConfig, mesh: jax.sharding.Mesh, rules, seed: int):
    """The stage's sharded trainer (with its discriminator, if the stage has one)."""
    player = spec.player
    return create_trainer(spec.make_model, make_optimizer(cfg.optim, cfg.steps), mesh, rules, seed,
                          make_disc=player.make if player else None, disc_tx=player.tx if player else None,
                          guard_window=cfg.loss_spike_window, trainable=cfg.trainable,
                          where=f"{spec.name}.trainable")


def _fine_tune_base(st, state: nnx.State, cfg: StageConfig, stage_name: str, out_dir: str,
                    resumed: bool) -> tuple[nnx.State, nnx.State]:
    """(state, frozen params) of a fine-tune (trainable not full): the frozen params read from the base.

    A fresh start records the base in `base.json` (checkpoint, step, EMA or not, fingerprint, trained paths) and
    also initialises the trained params that the base has (frozen-subset training, `trainable.params`) from it;
    LoRA factors keep their init (B = 0: the model starts as its base). A resumed run reads the base named in
    `base.json`, after checking its fingerprint.
    """
    trained = [trainable.path_name(p) for p, v in nnx.to_flat_state(st.abstract_state["model"])
               if isinstance(v, nnx.Param)]
    if resumed:
        info = trainable.read_base(out_dir)
        if info is None:
            raise FileNotFoundError(f"{out_dir} has checkpoints of a {cfg.trainable.mode.value} fine-tune but no "
                                    f"{trainable.BASE_FILE}: the base its frozen params come from is unknown")
        if os.path.abspath(cfg.init_from) != info["checkpoint"]:
            logging.warning("%s: resuming on the base recorded in %s (%s), not %s=%s", stage_name,
                            trainable.BASE_FILE, info["checkpoint"], f"{stage_name}.init_from", cfg.init_from)
    else:
        _, (base,) = find_checkpoints(cfg.init_from)
        info = {"checkpoint": os.path.abspath(cfg.init_from), "step": base.step, "use_ema": cfg.init_from_ema,
                "sha256": trainable.fingerprint(base.state_dir), "mode": cfg.trainable.mode.value,
                "frozen_dtype": cfg.trainable.frozen_dtype, "trained": trained}
        if jax.process_index() == 0:
            trainable.write_base(out_dir, info)
    _, (base,) = find_checkpoints(info["checkpoint"], info["step"])
    trainable.check_base(info, out_dir, base.state_dir)
    read = functools.partial(restore_state, info["checkpoint"], step=info["step"], use_ema=info["use_ema"])
    frozen = read(st.frozen_abstract, shardings=st.frozen_shardings)
    if not resumed:  # trained params the base has start from it (model and EMA); LoRA factors keep their init
        keep = lambda state: nnx.from_flat_state(
            [(p, v) for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.LoRAParam)])
        known = keep(st.abstract_state["model"])
        if jax.tree.leaves(known):
            params = read(known, shardings=keep(st.shardings["model"]))
            trainer = merge_trainer(st.graphdef, state, frozen)
            nnx.update(trainer.model, params)
            nnx.update(trainer.ema, jax.tree.map(lambda x: x.copy(), params))  # the step donates both
            state = own_state(trainer, cfg.trainable)
    logging.info("%s: %s fine-tune of %s (step %d, %s): %d trained param arrays, frozen params in %s", stage_name,
                 cfg.trainable.mode.value, info["checkpoint"], info["step"], "EMA" if info["use_ema"] else "model",
                 len(trained), cfg.trainable.frozen_dtype)
    return state, frozen


def _init_from(st, state: nnx.State, cfg: StageConfig) -> nnx.State:
    """`state` with model and EMA params replaced by those of the checkpoint `cfg.init_from` (fresh optimiser)."""
    abstract_model = nnx.merge(st.graphdef, st.abstract_state).model
    abstract, shardings = nnx.state(abstract_model), st.shardings["model"]
    _, (ckpt,) = find_checkpoints(cfg.init_from)
    saved = saved_param_names(ckpt.state_dir, "ema" if cfg.init_from_ema else "model")
    names = [trainable.path_name(p) for p, _ in nnx.to_flat_state(abstract)]
    new = [n for n in names if saved is not None and n not in saved]
    if new and all(any(part in ADAPTER_PARAMS for part in n.split("/")) for n in new):
        # A condition adapter the base does not have (e.g. a camera adapter on a text-to-video base) keeps its
        # (zero) init: the model starts as the base.
        logging.info("init_from: %d condition-adapter params are not in %s and keep their init: %s", len(new),
                     cfg.init_from, sorted({n.rsplit("/", 1)[0] for n in new}))
        keep = lambda state: nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state)
                                                  if trainable.path_name(p) not in new])
        params = restore_state(cfg.init_from, keep(abstract), use_ema=cfg.init_from_ema, shardings=keep(shardings))
    else:
        params = restore_params(cfg.init_from, abstract_model, use_ema=cfg.init_from_ema, shardings=shardings)
    trainer = nnx.merge(st.graphdef, state)
    nnx.update(trainer.model, params)
    # Separate buffers: the step donates model and EMA, and one buffer cannot be donated twice.
    nnx.update(trainer.ema, jax.tree.map(lambda x: x.copy(), params))
    return nnx.state(trainer)


def train_stage(spec: StageSpec, cfg: StageConfig, *, workdir: str, mesh: jax.sharding.Mesh,
                seed: int) -> dict[str, Any]:
    """Train one stage to cfg.steps, resuming from the stage's latest checkpoint if there is one."""
    # --- Setup -------------------------------------------------------------------------------------
    out_dir = stage_dir(workdir, spec.name)
    rules = get_rules(cfg.sharding, spec.rules_kind)
    n_proc, proc = jax.process_count(), jax.process_index()
    data_size = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % data_size or cfg.batch_size % n_proc:
        raise ValueError(
            f"{spec.name}.batch_size={cfg.batch_size} must be divisible by the data x fsdp mesh size ({data_size}) "
            f"and by the process count ({n_proc})"
        )
    per_host = cfg.batch_size // n_proc

    # --- Data --------------------------------------------------------------------------------------
    data_iter = iter(spec.make_dataset(per_host, seed, proc, n_proc))

    # --- State (abstract first, then initialised onto the mesh) ------------------------------------
    st = _create_trainer(spec, cfg, mesh, rules, seed)
    logging.info("%s: %s trained params%s", spec.name, f"{param_count(st.state):,}",
                 "" if st.frozen is None else f", {param_count(nnx.State({'model': st.frozen})):,} frozen")
    if spec.player:
        logging.info("%s: %s %s params, trains from step %d", spec.name, spec.player.name,
                     f"{param_count(st.state, 'disc'):,}", spec.player.start)
    frozen = frozen_shardings = None
    if spec.frozen:  # replicated, except arrays that come sharded on this mesh (a teacher model) keep their sharding
        frozen = spec.frozen()
        replicated = NamedSharding(mesh, PartitionSpec())
        frozen_shardings = jax.tree.map(
            lambda a: a.sharding if isinstance(getattr(a, "sharding", None), NamedSharding) else replicated, frozen)
        frozen = jax.device_put(frozen, frozen_shardings)
    extra = () if frozen is None else (frozen,)

    # --- Restore -----------------------------------------------------------------------------------
    ckpt = Checkpointer(checkpoint_dir(workdir, spec.name), keep=cfg.keep_checkpoints)
    state, start = st.state, 0
    try:
        restored = ckpt.restore_latest(abstract_with_shardings(st.abstract_state, st.shardings))
    except Exception:
        ckpt.close()
        raise
    if restored is not None:
        latest, state, iter_state = restored
        if (own := local_iterator_state(iter_state)) is not None:
            data_iter.set_state(own)
        start = latest
        logging.info("%s: resumed from step %d", spec.name, latest)
    elif cfg.init_from and st.frozen is None:
        state = _init_from(st, state, cfg)
        logging.info("%s: initialised params from %s (%s)", spec.name, cfg.init_from,
                     "EMA" if cfg.init_from_ema else "model")
    frozen_params = None
    if st.frozen is not None:
        try:
            state, frozen_params = _fine_tune_base(st, state, cfg, spec.name, out_dir, restored is not None)
        except Exception:
            ckpt.close()
            raise
    if start >= cfg.steps:
        ckpt.close()
        return {"step": start, "resumed": True, "finished": True}

    # --- Compile step 0 ahead of time, log memory --------------------------------------------------
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        train_step = make_train_step(st.graphdef, spec.loss_fn, ema_decay=cfg.optim.ema_decay,
                                     player_update=spec.player.update if spec.player else None, frozen=bool(extra),
                                     guard=step_guard.GuardConfig(spike_factor=cfg.loss_spike_factor),
                                     trainable=cfg.trainable)
        step_fn = compile_train_step(train_step, st.shardings, mesh, frozen=bool(extra),
                                     frozen_param_shardings=st.frozen_shardings, frozen_arg_shardings=frozen_shardings)
        if frozen_params is not None:
            extra = (*extra, frozen_params)
        local = next(data_iter)
        batch = global_batch(spec.to_batch(local), batch_sharding(mesh))
        base_key = jax.random.key(seed)
        t0 = time.time()
        compiled = step_fn.lower(state, batch, base_key, *extra).compile()
        logging.info("%s: compiled step in %.1fs; memory %s", spec.name, time.time() - t0, compiled.memory_analysis())

    # --- Train -------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, spec.name)
    lr = learning_rate_schedule(cfg.optim, cfg.steps)
    summary: dict[str, Any] = {"start_step": start}
    ran, t_last, step = 0, time.time(), start
    bar = tqdm(total=cfg.steps, initial=start, desc=spec.name, disable=proc != 0, mininterval=2.0)

    def stop_if_unhealthy(state: nnx.State, *, saving: bool) -> None:
        """Raise NonFiniteStepError (after closing the writers) if the run must stop; before a save, also if the
        state is not finite. A few scalars are fetched."""
        rep = step_guard.report(state)
        streak_too_long = rep["worst_streak"] > cfg.max_nonfinite_steps
        if not streak_too_long and not (saving and not step_guard.state_is_finite(state)):
            return
        ckpt.wait()  # the message names the last complete checkpoint
        message = step_guard.stop_message(spec.name, rep, cfg.max_nonfinite_steps, ckpt.latest_step()) or (
            f"{spec.name}: the train state at step {step} holds NaN or Inf values; it is not saved (last checkpoint: "
            f"step {ckpt.latest_step()}). Rerun to resume from there.")
        logging.error(message)
        writer.write(step, {"skipped_steps": rep["skipped"], "stopped": message})
        bar.close()
        ckpt.close()
        writer.close()
        raise step_guard.NonFiniteStepError(message)

    with PreemptionGuard() as guard, jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        pending = local  # the batch drawn for compilation is the first one trained on
        while step < cfg.steps:
            local = pending if pending is not None else next(data_iter)
            pending = None
            host_batch = spec.to_batch(local)
            batch = global_batch(host_batch, batch_sharding(mesh))
            fingerprint = _fingerprint(host_batch)
            state, metrics = compiled(state, batch, base_key, *extra)  # async dispatch: the next load overlaps
            step, ran = step + 1, ran + 1
            bar.update(1)
            preempted = guard.should_stop(step)  # agreed by every process
            stop = preempted or (cfg.max_steps_per_run and ran >= cfg.max_steps_per_run)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                applied = step - 1 - int(metrics.get("skipped_steps", 0) - metrics.get("skipped", 0))  # optimizer step
                metrics.update(lr=float(lr(applied)), data_fingerprint=fingerprint,
                               steps_per_sec=cfg.log_every / max(now - t_last, 1e-9))
                t_last = now
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                summary["loss"] = metrics["loss"]
                if metrics.get("skipped_steps"):
                    stop_if_unhealthy(state, saving=False)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                stop_if_unhealthy(state, saving=True)  # never save after a streak past the limit, nor NaN/Inf
                # The iterator state now points at the batch the next step will use.
                ckpt.save(step, state, gather_iterator_states(data_iter.get_state()), force=True)
            if spec.on_sample and ((cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps):
                trainer = merge_trainer(st.graphdef, state, frozen_params)
                writer.write(step, spec.on_sample(trainer.ema, step, out_dir))
            if stop:
                logging.info("%s: stopping at step %d (%s)", spec.name, step,
                             "preempted" if preempted else "max_steps_per_run")
                break
    bar.close()
    ckpt.close()
    writer.close()
    summary.update(step=step, finished=step >= cfg.steps, skipped_steps=step_guard.report(state)["skipped"])
    return summary
