"""A pass-through dataset stage whose iterator state records the shard files it reads.

A shard deleted while a run reads it changes nothing for that run (the open file stays readable), but the next run
lists fewer shards, and a restored iterator position then points into a different stream: resume would silently
stop being exact. This stage keeps `{name: size in bytes}` of every shard in the iterator state (so in every
checkpoint) and, on restore, warns naming each shard that is missing, new or rewritten. A shard missing when the
iterator is created is a FileNotFoundError naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
from absl import logging

SHARDS_STATE_KEY = "shards"


def shard_sizes(paths: Sequence[str]) -> dict[str, int]:
    """{file name: size in bytes} of `paths`; FileNotFoundError naming every missing one."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"data shard(s) missing: {', '.join(missing)} ({len(missing)} of {len(paths)} listed)")
    return {os.path.basename(p): os.path.getsize(p) for p in paths}


def shard_changes(saved: dict[str, int], now: dict[str, int]) -> list[str]:
    """Human-readable differences between the checkpointed shard set and the current one."""
    out = [f"{name} is missing" for name in sorted(set(saved) - set(now))]
    out += [f"{name} is new" for name in sorted(set(now) - set(saved))]
    out += [f"{name} changed size ({saved[name]} -> {now[name]} bytes)" for name in sorted(set(saved) & set(now))
            if saved[name] != now[name]]
    return out


class _ShardCheckIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, shards: dict[str, int], directory: str):
        super().__init__(parent)
        self._shards, self._directory = shards, directory

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), SHARDS_STATE_KEY: dict(self._shards)}

    def set_state(self, state: dict[str, Any]) -> None:
        if SHARDS_STATE_KEY not in state:  # a state written without this stage
            self._parent.set_state(state)
            return
        if changes := shard_changes(state[SHARDS_STATE_KEY], self._shards):
            logging.warning("data shards in %s changed since the checkpoint: %s. The data stream after this resume "
                            "differs from an uninterrupted run's (resume is not exact)", self._directory,
                            "; ".join(changes))
        self._parent.set_state(state["parent"])


class ShardCheckIterDataset(grain.IterDataset):
    """`parent` unchanged; its iterator's state also records the shard files `paths` (see the module doc)."""

    def __init__(self, parent: grain.IterDataset, paths: Sequence[str]):
        super().__init__(parent)
        self.paths = list(paths)

    def __iter__(self) -> _ShardCheckIterator:
        directory = os.path.dirname(self.paths[0]) if self.paths else ""
        return _ShardCheckIterator(self._parent.__iter__(), shard_sizes(self.paths), directory)

    def __str__(self) -> str:
        return f"ShardCheckIterDataset({len(self.paths)} shards)"
