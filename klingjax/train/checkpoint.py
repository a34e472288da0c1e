"""Orbax checkpoints of `{state, data_iter}`: async, atomic, keep-N, restored into sharded abstract state."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

_SAVE_ARGS = ocp.SaveArgs(chunk_byte_size=256 * 2**20)  # at most 256 MiB per stored chunk


class Checkpointer:
    """One CheckpointManager per stage directory; saves the train state and the data-iterator state together.

    Orbax writes each step to a temporary directory and renames it when complete, so a crash or
    preemption mid-save never corrupts the last good checkpoint.
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data_iter"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: nnx.State, data_iter_state: dict[str, Any] | None, *, force: bool = False) -> bool:
        """Start an (async) save of `state` and the iterator state at `step`."""
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
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int | None, abstract_state: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
        """Restore `step` (latest if None) into `abstract_state` (ShapeDtypeStructs carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data_iter"] or {})

    def restore_params(self, step: int | None, abstract_state: nnx.State) -> nnx.State:
        """Restore only the state (e.g. a trained model for sampling), ignoring the data iterator."""
        return self.restore(step, abstract_state)[0]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


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
