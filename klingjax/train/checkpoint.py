"""Orbax checkpoints of `{state, data_iter}`: async, atomic, keep-N, restored into sharded abstract state.

Also: finding a stage's checkpoints on disk (`find_checkpoints`) and the params-only restore of a model or its
EMA (`restore_params`, `restore_model`) that sampling, export and `init_from` use: it reads the `model` (or
`ema`) subtree alone into an abstract model, so no optimizer state is ever allocated.

Faults. Resuming training (`Checkpointer.restore_latest`) falls back: a newest checkpoint that cannot be read
(truncated or corrupt files) or holds non-finite values is skipped with a warning naming the step and the error,
and the next older one is used; the bad ones are then moved aside to `<checkpoints>_corrupt/`. Readers of one
chosen checkpoint (export, generation, `init_from`) do not fall back, since the user named what to read: they
raise `CorruptCheckpointError` naming the checkpoint, what is wrong and the other steps there. A failing save
(disk full, permissions) raises `CheckpointSaveError` naming the step, the directory and the cause; Orbax writes
each step into a temporary directory renamed only when complete, so the checkpoints already on disk stay intact.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from klingjax.sharding.rules import Rules
from klingjax.train import trainable
from klingjax.train.guard import state_is_finite
from klingjax.train.state import state_shardings

# TensorStore's status prefixes for files that cannot be read (truncated, missing, garbled); a shape mismatch has none.
_IO_STATUS = re.compile(r"(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|UNKNOWN|INTERNAL|UNAVAILABLE): ")
_SAVE_ARGS = ocp.SaveArgs(chunk_byte_size=256 * 2**20)  # at most 256 MiB per stored chunk
WORKDIR_STAGES = ("dit", "vae")  # the models a work dir path stands for (export, restore): the teacher pipeline
STAGES = WORKDIR_STAGES + ("distill",)  # stage directories a checkpoint path may name ("distill": a student DiT)


class ArchitectureError(ValueError):
    """The checkpoint's parameters do not fit the model its config describes."""


class CorruptCheckpointError(ValueError):
    """A checkpoint on disk cannot be read: truncated, corrupt or half-written files."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permissions, ...); the checkpoints already on disk are intact."""


def describe_error(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, shortened (TensorStore errors carry a whole spec)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class StageCheckpoint:
    """One stage's checkpoint at one step."""

    stage: str  # "dit" | "vae" | "distill"
    directory: str  # <workdir>/<stage>/checkpoints
    step: int

    @property
    def state_dir(self) -> str:
        return os.path.join(self.directory, str(self.step), "state")


def list_steps(directory: str) -> list[int]:
    """Finished checkpoint steps in an Orbax manager directory (temporary, half-written ones are skipped)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def _other_steps(ckpt: StageCheckpoint) -> str:
    others = [s for s in list_steps(ckpt.directory) if s != ckpt.step]
    return (f"other checkpoints there: steps {others} (choose one with --step / step=)" if others
            else "there is no other checkpoint there")


def corrupt_error(ckpt: StageCheckpoint, what: str) -> CorruptCheckpointError:
    """The error for an unreadable checkpoint: which one, what is wrong, what else there is."""
    return CorruptCheckpointError(f"{ckpt.stage} checkpoint step {ckpt.step} ({ckpt.state_dir}) is unreadable: "
                                  f"{what}. It is truncated, corrupt or was not completely written; "
                                  f"{_other_steps(ckpt)}")


def check_metadata(ckpt: StageCheckpoint) -> None:
    """Raise CorruptCheckpointError unless the step's `state/_METADATA` (the array index) exists and parses."""
    meta = os.path.join(ckpt.state_dir, "_METADATA")
    if not os.path.isfile(meta):
        raise corrupt_error(ckpt, "state/_METADATA is missing")
    try:
        with open(meta) as f:
            json.load(f)["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise corrupt_error(ckpt, f"state/_METADATA does not parse ({describe_error(e)})") from None


def _pick_step(stage: str, directory: str, step: int | None) -> StageCheckpoint:
    steps = list_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{stage}: no checkpoint for step {step} in {directory}; available steps: {steps}")
    ckpt = StageCheckpoint(stage, directory, step)
    check_metadata(ckpt)
    return ckpt


def find_checkpoints(path: str, step: int | None = None) -> tuple[str, list[StageCheckpoint]]:
    """(workdir, checkpoints) for a workdir, a stage dir, its `checkpoints/` dir or one step's dir.

    A workdir yields every stage it has (DiT first); `step` then selects the DiT's step, the VAE uses its latest.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        found = [s for s in WORKDIR_STAGES if os.path.isdir(os.path.join(path, s, "checkpoints"))]
        if not found:
            raise FileNotFoundError(f"workdir {path} has no {' or '.join(WORKDIR_STAGES)} checkpoints")
        picks = [_pick_step(s, os.path.join(path, s, "checkpoints"), step if s == "dit" else None) for s in found]
        return path, picks
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):  # one step's directory
        if step is not None and step != int(base):
            raise ValueError(f"--step {step} contradicts the step directory {path}")
        step, path = int(base), os.path.dirname(path)
        base = os.path.basename(path)
    if base != "checkpoints":
        path = os.path.join(path, "checkpoints")
    stage = os.path.basename(os.path.dirname(path))
    if stage not in STAGES:
        raise ValueError(f"cannot tell which model {path} holds: stage directories are named {STAGES}")
    workdir = os.path.dirname(os.path.dirname(path))
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir}/config.json is missing: the model architecture is read from it")
    return workdir, [_pick_step(stage, path, step)]



class Checkpointer:
    """One CheckpointManager per stage directory; saves the train state and the data-iterator state together.

    Orbax writes each step to a temporary directory and renames it when complete, so a crash or
    preemption mid-save never corrupts the last good checkpoint.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data_iter"))
        self._pending: int | None = None  # the step an async save is writing

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: nnx.State, data_iter_state: dict[str, Any] | None, *, force: bool = False) -> bool:
        """Start an (async) save of `state` and the iterator state at `step`.

        Raises CheckpointSaveError if this save, or the previous async one, fails.
        """
        self.wait()  # the previous save's error (if any) is reported under its own step
        try:
            saved = self._mngr.save(
                step,
                args=ocp.args.Composite(
                    # Bounded chunks: readers (klingjax-export) can then stream one chunk at a time instead of
                    # loading a whole stacked (layers, ...) array.
                    state=ocp.args.StandardSave(state, save_args=jax.tree.map(lambda _: _SAVE_ARGS, state)),
                    data_iter=ocp.args.JsonSave(data_iter_state or {}),
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write becomes one clear error
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        cause, chain = describe_error(e), e
        while chain is not None:
            if isinstance(chain, OSError) and chain.errno == errno.ENOSPC or "No space left" in str(chain):
                cause = f"the disk is full ({cause})"
                break
            chain = chain.__cause__ or chain.__context__
        done = list_steps(self.directory)
        return CheckpointSaveError(
            f"checkpoint: saving step {step} to {self.directory} failed: {cause}. The checkpoints already written "
            f"are intact ({'steps ' + str(done) if done else 'none'}); fix the cause and rerun to resume "
            f"{'from step ' + str(done[-1]) if done else 'from scratch'}.")

    def restore(self, step: int | None, abstract_state: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
        """Restore `step` (latest if None) into `abstract_state` (ShapeDtypeStructs carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        # A checkpoint written before the step guard existed has no `guard` subtree: restore the rest, start the
        # guard's counters afresh (they are all zeros at the start of training).
        keys = _top_level_keys(self.directory, step)
        fresh = "guard" in abstract_state and bool(keys) and "guard" not in keys
        target = nnx.State({k: abstract_state[k] for k in abstract_state if k != "guard"}) if fresh else abstract_state
        restored = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data_iter=ocp.args.JsonRestore()),
        )
        state = restored["state"]
        if fresh:
            logging.warning("checkpoint step %d predates the step guard: its skip counters start at zero", step)
            got = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
            paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
            state = jax.tree_util.tree_unflatten(treedef, [
                got[p] if p in got else jnp.zeros(a.shape, a.dtype, device=a.sharding) for p, a in paths])
        return state, dict(restored["data_iter"] or {})

    def restore_latest(self, abstract_state: nnx.State) -> tuple[int, nnx.State, dict[str, Any]] | None:
        """(step, state, iterator state) of the newest good checkpoint; None if there is none.

        A checkpoint that fails to restore or holds non-finite values is skipped with a warning, and the next older
        one is tried. Once a good one is found the bad ones are moved to `<directory>_corrupt/`, so that this run
        can write those steps again. If none is good, CorruptCheckpointError lists every step and its error and
        nothing is moved (a config that no longer fits any checkpoint is not corruption).
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, iter_state = self.restore(step, abstract_state)
                if not state_is_finite(state):
                    raise CorruptCheckpointError("it holds NaN or Inf values")
            except Exception as e:  # noqa: BLE001 - whatever is wrong with it, an older one may be good
                failures.append((step, describe_error(e)))
                logging.warning("checkpoint step %d in %s is unreadable (%s); trying the next older one", step,
                                self.directory, failures[-1][1])
                continue
            if failures:
                self._quarantine([s for s, _ in failures])
                logging.warning("resuming from checkpoint step %d: the newer step(s) %s were unreadable and are moved "
                                "to %s_corrupt/", step, [s for s, _ in failures], self.directory)
            return step, state, iter_state
        if failures:
            tried = "\n".join(f"  step {s}: {err}" for s, err in failures)
            raise CorruptCheckpointError(f"no checkpoint in {self.directory} can be restored:\n{tried}\n(if the "
                                         "config changed since they were written, they do not fit this model)")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Move unreadable step directories out of the manager's directory (host 0), then re-list the steps."""
        if jax.process_index() == 0:
            aside = f"{self.directory}_corrupt"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if os.path.exists(src):
                    shutil.move(src, os.path.join(aside, f"{step}-{int(time.time())}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint_quarantine")
        self._mngr.reload()

    def wait(self) -> None:
        """Wait for the pending async save; raises CheckpointSaveError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(step, e) from e

    def close(self) -> None:
        self.wait()
        self._mngr.close()


def saved_param_names(state_dir: str, key: str) -> set[str] | None:
    """The "/"-joined param paths of a checkpoint's `key` ("model" | "ema") subtree, from its `_METADATA` (None if it
    cannot be read)."""
    try:
        with open(os.path.join(state_dir, "_METADATA")) as f:
            entries = json.load(f)["tree_metadata"].values()
        out = set()
        for e in entries:
            keys = [str(k["key"]) for k in e["key_metadata"]]
            if keys and keys[0] == key:
                out.add("/".join(keys[1:-1] if keys[-1] == "value" else keys[1:]))
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _top_level_keys(directory: str, step: int) -> set[str]:
    """The top-level keys of a step's saved state, from its `_METADATA` (empty set if it cannot be read)."""
    try:
        with open(os.path.join(directory, str(step), "state", "_METADATA")) as f:
            entries = json.load(f)["tree_metadata"].values()
        return {str(e["key_metadata"][0]["key"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return set()


def gather_iterator_states(local_state: dict[str, Any]) -> dict[str, Any]:
    """Every process's data-iterator state, keyed `process_I` (a collective: call it on every process).

    Orbax writes a JSON item from the primary host only, and each host's Grain iterator reads its own shard,
    so the checkpoint must hold all of them for every host to resume exactly.
    """
    count = jax.process_count()
    if count == 1:
        return {"process_count": 1, "process_0": local_state}
    encoded = np.frombuffer(json.dumps(local_state).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(count, -1)  # (P, max_len)
    states = {f"process_{i}": json.loads(rows[i, : lengths[i]].tobytes().decode("utf-8")) for i in range(count)}
    return {"process_count": count, **states}


def local_iterator_state(saved: dict[str, Any]) -> dict[str, Any] | None:
    """This process's iterator state from a checkpoint's `data_iter` item (None: start the data afresh)."""
    if not saved:
        return None
    if "process_count" not in saved:  # written before per-process states: one state for every host
        return saved
    if saved["process_count"] != jax.process_count():
        logging.warning("checkpoint data iterators are from %d processes, this run has %d: the data stream restarts",
                        saved["process_count"], jax.process_count())
        return None
    return saved[f"process_{jax.process_index()}"]


def abstract_with_shardings(abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


# ---------------------------------------------------------------------------------------------------------
# Params-only restore
# ---------------------------------------------------------------------------------------------------------


def restore_params(checkpoint: str, abstract_model: nnx.Module, *, step: int | None = None, use_ema: bool = False,
                   shardings: nnx.State | None = None) -> nnx.State:
    """The model (or EMA) params of a stage checkpoint as an `nnx.State`, without optimiser or data state.

    `checkpoint` is a stage dir (`<workdir>/dit`), its `checkpoints/` dir or one step's dir, written by the train
    loop or by `klingjax-import`. `abstract_model` fixes the expected structure (`nnx.eval_shape` of the model);
    `shardings` (same structure, NamedShardings) places the arrays on a mesh. Raises ArchitectureError when
    shapes differ. A fine-tune's checkpoint (LoRA / frozen subset: its stage dir has `base.json`) holds only the
    trained params: the rest is read from its base (fingerprint checked), see `restore_state`.
    """
    return restore_state(checkpoint, nnx.state(abstract_model), step=step, use_ema=use_ema, shardings=shardings)


def restore_state(checkpoint: str, abstract: nnx.State, *, step: int | None = None, use_ema: bool = False,
                  shardings: nnx.State | None = None) -> nnx.State:
    """`restore_params` on an abstract `nnx.State` (any subset of a model's params; dtypes are cast to its own)."""
    _, (ckpt,) = find_checkpoints(checkpoint, step)  # checks the step's array index (_METADATA)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda a: one, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    stage_dir = os.path.dirname(ckpt.directory)
    base = trainable.read_base(stage_dir)
    if base is None:
        return _restore_subtree(ckpt, target, "ema" if use_ema else "model")
    # A fine-tune: trained leaves from this checkpoint, the others from its base (itself perhaps a fine-tune).
    trained = set(base["trained"])
    flat = nnx.to_flat_state(target)
    wanted = {trainable.path_name(p) for p, _ in flat}
    if missing := sorted(n for n in trained if n.rsplit("/", 1)[-1] in ("lora_a", "lora_b") and n not in wanted):
        raise ArchitectureError(
            f"{ckpt.state_dir} is a LoRA fine-tune ({len(missing)} factors, e.g. {missing[0]}) but the model it is "
            "read into has no LoRA layers there: read it with its own config (dit.trainable), or fold the factors in "
            "first with klingjax-merge-lora")
    own = nnx.from_flat_state([(p, v) for p, v in flat if trainable.path_name(p) in trained])
    rest = nnx.from_flat_state([(p, v) for p, v in flat if trainable.path_name(p) not in trained])
    parts = []
    if jax.tree.leaves(rest):
        _, (base_ckpt,) = find_checkpoints(base["checkpoint"], base["step"])
        trainable.check_base(base, stage_dir, base_ckpt.state_dir)
        parts.append(restore_state(base["checkpoint"], rest, step=base["step"], use_ema=base["use_ema"],
                                   shardings=jax.tree.map(lambda a: a.sharding, rest)))
    if jax.tree.leaves(own):
        parts.append(_restore_subtree(ckpt, own, "ema" if use_ema else "model"))
    return nnx.merge_state(*parts) if len(parts) > 1 else parts[0]


def _restore_subtree(ckpt: StageCheckpoint, target: nnx.State, key: str) -> nnx.State:
    """The `key` ("model" | "ema") subtree of `ckpt` restored into `target` (ShapeDtypeStructs with shardings)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            ckpt.state_dir,
            args=ocp.args.PyTreeRestore(item={key: target}, restore_args={key: restore_args}, partial_restore=True),
        )
    except Exception as e:  # noqa: BLE001 - TensorStore reports unreadable files as ValueError or bare Exception
        if isinstance(e, ValueError) and not _IO_STATUS.match(str(e)):
            raise ArchitectureError(f"{ckpt.state_dir} does not fit the given model: {e}") from e
        raise corrupt_error(ckpt, describe_error(e)) from e
    flat = jax.tree_util.tree_flatten_with_path(restored[key])[0]
    missing = [jax.tree_util.keystr(p, simple=True, separator="/") for p, v in flat
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:  # a partial restore leaves what the checkpoint lacks as the target's ShapeDtypeStructs
        more = " ..." if len(missing) > 6 else ""
        raise ArchitectureError(f"{ckpt.state_dir} has no {key} params {missing[:6]}{more} ({len(missing)} in all) "
                                "that the given model has")
    return restored[key]


def restore_model(make_model, checkpoint: str, *, mesh: jax.sharding.Mesh, rules: Rules, use_ema: bool = True,
                  step: int | None = None) -> nnx.Module:
    """A trained model (its EMA by default) built abstractly, sharded by `rules` on `mesh`, params restored.

    `make_model(rngs) -> nnx.Module`. Only the model's own params are allocated: no optimizer, no second copy.
    """
    abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    params = restore_params(checkpoint, abstract, step=step, use_ema=use_ema, shardings=shardings)
    return nnx.merge(graphdef, params)


class PreemptionGuard:
    """Turns SIGTERM (preemption notice) into a stop decision the loop polls, so it saves before exiting.

    One process: a Python SIGTERM handler sets a flag. Several processes: every host must stop at the same
    step (or the others hang in the next collective), so JAX's preemption sync service decides; its own
    SIGTERM handler must stay installed, so no Python handler is set.
    """

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None
        self._multihost = False

    def __enter__(self):
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will checkpoint and stop after this step")
        self.requested.set()

    def should_stop(self, step: int) -> bool:
        """Call once per step on every process: True when all of them should checkpoint and stop now."""
        if self._multihost:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.requested.set()
            except RuntimeError as e:  # preemption service disabled: nothing can be agreed on
                logging.log_first_n(logging.WARNING, "no multi-host preemption sync: %s", 1, e)
        return self.requested.is_set()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
